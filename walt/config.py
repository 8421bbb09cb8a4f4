"""Run configuration: dataclasses layered as defaults <- preset <- YAML files <- --set overrides.

Every run writes its resolved config to <out_dir>/config.yaml; `walt-train --dry-run` prints it.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field

import yaml

from walt.diffusion.objective import DiffusionConfig
from walt.models.autoencoder import AutoencoderConfig
from walt.models.presets import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS
from walt.models.transformer import TransformerConfig


@dataclass
class DataConfig:
    kind: str = "moving_shapes"  # "moving_shapes" (synthetic), "world" (walt-data store), "tensor" (clips file), "factory"
    num_clips: int = 1024  # moving_shapes: clips, frames per clip and frame size (other kinds bring their own)
    frames: int = 17
    size: int = 128
    path: str = ""  # world: the store's directory; tensor: a .safetensors/.pt file with "video" (N, T, 3, H, W)
    factory: str = ""  # factory: "module:callable" returning a map-style dataset of clips
    kwargs: dict = field(default_factory=dict)
    num_workers: int = 0


@dataclass
class AutoencoderLossConfig:
    recon: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-4  # per latent element (the KL is a mean, like the reconstruction)
    disc_weight: float = 0.0  # > 0 enables the 3D patch discriminator (hinge loss)
    disc_start: int = 0  # step from which the adversarial term is used
    disc_channels: int = 64
    stats_batches: int = 16  # batches of training data for the latent mean/std


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 64  # global, over all ranks
    grad_accum: int = 1  # micro-batches per step on each rank (same result, less memory)
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 disables the EMA copy
    ckpt_every: int = 1000
    log_every: int = 10
    sample_every: int = 0  # diffusion: DDIM samples every N steps (0: only at the end)
    num_samples: int = 4
    seed: int = 0
    # Diffusion stage. I-WALT draws batch x T' frames per step (T' = latent frames of a clip), so
    # it sees as many latent tokens per step as V-WALT: the comparison is at matched compute.
    match_tokens: bool = True
    # Encode the training clips once (frozen autoencoder, posterior means) and train on the cached
    # latents instead of encoding every batch: the same latents, far less work for small models.
    # Not with image_fraction > 0.
    cache_latents: bool = False
    image_fraction: float = 0.0  # V-WALT: share of steps that train on single frames (joint image-video)
    # EMA snapshots kept as snapshots/step-NNNNNN.safetensors: floats are fractions of train.steps,
    # integers are steps; e.g. [0.1, 0.2, 0.4, 1.0] for the training-budget sweep.
    keep_every: tuple = ()
    precision: str = "bf16"  # "bf16" autocast on GPU; "fp32" always. CPUs always run fp32.
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 0  # CPU intra-op threads per process (0: torch's default)
    compile: bool = False
    tensorboard: bool = False


@dataclass
class RunConfig:
    stage: str = "diffusion"  # "autoencoder" or "diffusion"
    preset: str = "cpu"
    out_dir: str = "runs/walt"
    autoencoder_run: str = ""  # diffusion stage: output directory of the autoencoder run
    model: TransformerConfig = field(default_factory=TransformerConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ae_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_PAPER = dict(autoencoder=AUTOENCODER_PRESETS["paper"], data=dict(frames=17, size=128))
PRESETS = {
    # Runs of a few dozen steps finish in about a minute on two CPU cores.
    "cpu": dict(
        model=TRANSFORMER_PRESETS["cpu"],
        autoencoder=AUTOENCODER_PRESETS["cpu"],
        data=dict(num_clips=64, frames=17, size=32),
        train=dict(
            steps=40, batch_size=4, lr=1e-3, warmup_steps=5, ema_decay=0.99, ckpt_every=20, log_every=5, precision="fp32",
            cache_latents=True
        ),
        ae_loss=dict(stats_batches=4),
        diffusion=dict(sample_steps=25),
    ),
    **{name: dict(model=TRANSFORMER_PRESETS[name], **_PAPER) for name in ("S", "B", "L", "XL", "G")},
}

# Keys that may differ when resuming (they change how long/often, not what is computed).
# train.threads is not one of them: CPU kernels (GEMM blocking, reductions) round differently at
# another thread count, so a bit-exact resume needs the same number of threads.
RESUMABLE_CHANGES = {"train.steps", "train.ckpt_every", "train.keep_every", "train.log_every", "train.sample_every", "train.tensorboard", "data.num_workers"}


class ConfigError(ValueError):
    pass


def _coerce(value, typ, key):
    origin = typing.get_origin(typ) or typ
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"config key {key!r} expects a {typ.__name__}, got {value!r}")
    return value


def merge(cfg, overrides, prefix=""):
    """A copy of dataclass `cfg` with the nested dict `overrides` applied; unknown keys are errors."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {overrides!r}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r}; expected one of {sorted(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, prefix + key + ".")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key)
    return dataclasses.replace(cfg, **changes)


def parse_set(items):
    """["train.lr=3e-4", "model.mode=image"] -> nested dict, values parsed as YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def resolve(preset=None, yaml_files=(), sets=(), extra=None):
    """The run config: defaults <- preset <- each YAML file <- --set items <- extra (CLI options)."""
    layers = []
    for path in yaml_files:
        try:
            with open(path) as f:
                layers.append(yaml.safe_load(f) or {})
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from e
    layers.append(parse_set(sets))
    layers.append(extra or {})
    name = preset or next((layer["preset"] for layer in reversed(layers) if "preset" in layer), RunConfig.preset)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = merge(RunConfig(), {**PRESETS[name], "preset": name})
    for layer in layers:
        cfg = merge(cfg, {k: v for k, v in layer.items() if k != "preset"})
    validate(cfg)
    return cfg


def validate(cfg):
    """Check every setting's type, range and choices; ConfigError (one sentence naming the key) on
    the first bad one. Runs before anything is written, so a bad invocation leaves no trace."""

    def fail(key, expected, value):
        raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")

    def integer(key, value, low, high=None):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        if not ok:
            fail(key, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]", value)

    def number(key, value, low, high=None, low_open=False, high_open=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
            fail(key, f"a number in {interval}", value)

    def choice(key, value, options):
        if value not in options:
            fail(key, "one of " + ", ".join(repr(o) for o in options), value)

    def ints(key, value, n=None):
        ok = isinstance(value, (tuple, list)) and (n is None or len(value) == n) and len(value) > 0
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        if not ok:
            fail(key, f"a list of {n or 'one or more'} integers >= 1", value)

    choice("stage", cfg.stage, ("autoencoder", "diffusion"))
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir.strip():
        fail("out_dir", "a directory path (--out)", cfg.out_dir)
    if cfg.stage == "diffusion" and cfg.autoencoder_run and not isinstance(cfg.autoencoder_run, str):
        fail("autoencoder_run", "a directory path (--autoencoder)", cfg.autoencoder_run)

    t = cfg.train
    integer("train.steps", t.steps, 1)
    integer("train.batch_size", t.batch_size, 1)
    integer("train.grad_accum", t.grad_accum, 1)
    number("train.lr", t.lr, 0, low_open=True)
    number("train.weight_decay", t.weight_decay, 0)
    if not (isinstance(t.betas, (tuple, list)) and len(t.betas) == 2):
        fail("train.betas", "a pair [beta1, beta2] of numbers in [0, 1)", t.betas)
    for i, b in enumerate(t.betas):
        number(f"train.betas[{i}]", b, 0, 1, high_open=True)
    integer("train.warmup_steps", t.warmup_steps, 0)
    number("train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    number("train.grad_clip", t.grad_clip, 0)
    number("train.ema_decay", t.ema_decay, 0, 1, high_open=True)
    integer("train.ckpt_every", t.ckpt_every, 1)
    integer("train.log_every", t.log_every, 1)
    integer("train.sample_every", t.sample_every, 0)
    integer("train.num_samples", t.num_samples, 0)
    integer("train.seed", t.seed, 0)
    choice("train.precision", t.precision, ("bf16", "fp32"))
    choice("train.device", t.device, ("auto", "cpu", "cuda"))
    integer("train.threads", t.threads, 0)

    d = cfg.data
    choice("data.kind", d.kind, ("moving_shapes", "world", "tensor", "factory"))
    integer("data.num_clips", d.num_clips, 1)
    integer("data.frames", d.frames, 1)
    integer("data.size", d.size, 1)
    integer("data.num_workers", d.num_workers, 0)
    if not isinstance(d.kwargs, dict):
        fail("data.kwargs", "a mapping of keyword arguments", d.kwargs)
    if d.kind in ("world", "tensor") and not (isinstance(d.path, str) and d.path.strip()):
        what = "a `walt-data generate` directory" if d.kind == "world" else "a .safetensors or .pt file of clips"
        raise ConfigError(f"data.kind {d.kind!r} needs data.path: {what} (--set data.path=...)")
    if d.kind == "factory" and not (isinstance(d.factory, str) and ":" in d.factory):
        fail("data.factory", "'module:callable' for data.kind 'factory'", d.factory)

    m = cfg.model
    choice("model.mode", m.mode, ("video", "image"))
    choice("model.attention_backend", m.attention_backend, ("fused", "torch"))
    for key in ("latent_channels", "patch_size", "depth", "width", "heads"):
        integer(f"model.{key}", getattr(m, key), 1)
    integer("model.lora_rank", m.lora_rank, 0)
    integer("model.num_classes", m.num_classes, 0)
    number("model.mlp_ratio", m.mlp_ratio, 0, low_open=True)
    for key in ("input_size", "spatial_window", "spatiotemporal_window"):
        ints(f"model.{key}", getattr(m, key), 3)
    if m.width % m.heads:
        fail("model.width", f"divisible by model.heads ({m.heads})", m.width)

    a = cfg.autoencoder
    for key in ("latent_channels", "base_channels", "num_res_blocks", "groups"):
        integer(f"autoencoder.{key}", getattr(a, key), 1)
    powers = tuple(2**k for k in range(1, 7))
    choice("autoencoder.spatial_factor", a.spatial_factor, powers)
    choice("autoencoder.temporal_factor", a.temporal_factor, tuple(p for p in (1,) + powers if p <= a.spatial_factor))
    ints("autoencoder.channel_mult", a.channel_mult)
    levels = powers.index(a.spatial_factor) + 2  # one level per factor of 2, plus the first
    if len(a.channel_mult) != levels:
        fail("autoencoder.channel_mult", f"{levels} entries for spatial_factor {a.spatial_factor}", a.channel_mult)

    f = cfg.diffusion
    integer("diffusion.num_steps", f.num_steps, 1)
    choice("diffusion.schedule", f.schedule, ("linear", "scaled_linear", "cosine"))
    number("diffusion.beta_start", f.beta_start, 0, 1, low_open=True, high_open=True)
    number("diffusion.beta_end", f.beta_end, 0, 1, low_open=True, high_open=True)
    number("diffusion.self_cond_prob", f.self_cond_prob, 0, 1)
    choice("diffusion.noise_backend", f.noise_backend, ("fused", "torch"))
    integer("diffusion.sample_steps", f.sample_steps, 1, f.num_steps)

    e = cfg.ae_loss
    choice("ae_loss.recon", e.recon, ("l1", "l2"))
    number("ae_loss.kl_weight", e.kl_weight, 0)
    number("ae_loss.disc_weight", e.disc_weight, 0)
    integer("ae_loss.disc_start", e.disc_start, 0)
    integer("ae_loss.disc_channels", e.disc_channels, 1)
    integer("ae_loss.stats_batches", e.stats_batches, 1)


def to_dict(cfg):
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml_file(path):
    with open(path) as f:
        return merge(RunConfig(), yaml.safe_load(f))


def diff(a, b, prefix=""):
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff(va, vb, prefix + k + ".")
        elif va != vb:
            keys.append(prefix + k)
    return keys
