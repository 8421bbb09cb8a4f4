"""Run configuration: dataclasses layered as defaults <- preset <- YAML files <- --set overrides.

Every run writes its resolved config to <out_dir>/config.yaml; `walt-train --dry-run` prints it.
"""
import dataclasses
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
            steps=40, batch_size=4, lr=1e-3, warmup_steps=5, ema_decay=0.99, ckpt_every=20, log_every=5, precision="fp32"
        ),
        ae_loss=dict(stats_batches=4),
        diffusion=dict(sample_steps=25),
    ),
    **{name: dict(model=TRANSFORMER_PRESETS[name], **_PAPER) for name in ("S", "B", "L", "XL", "G")},
}

# Keys that may differ when resuming (they change how long/often, not what is computed).
RESUMABLE_CHANGES = {"train.steps", "train.threads", "train.ckpt_every", "train.keep_every", "train.log_every", "train.sample_every", "train.tensorboard", "data.num_workers"}


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
    return cfg


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
