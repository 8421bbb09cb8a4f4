"""The study in one command: V-WALT vs I-WALT on the built-in world, with controls and sweeps.

    walt-probe study [--preset quick] [--out study]

Stages, each skipped when its outputs exist and match the preset (so a killed study resumes where
it stopped and finishes with the same numbers):

1. data         render the procedural world (train / val / test splits)
2. autoencoder  train the causal VAE (and its per-mode latent statistics)
3. iwalt, vwalt train I-WALT and V-WALT with the same budget: matched latent tokens per step,
                seeds and data; EMA snapshots for the training-budget sweep
4. losses       the diffusion loss of each model on val clips, trained and untrained
5. features     dump frozen features of both models, their untrained initial weights
                (`random:`) and the autoencoder latents (`latents:`) for every split
6. probes       fit every task's readout on every feature set (a grid of learning rates x
                readout seeds, best on val, reported on test)
7. report       DIR/report.md, DIR/results.json and figures (probes.report)

Everything is seeded; rerunning a preset on the same machine (and thread count) reproduces its
numbers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("walt.study")

TASKS = ("object", "scene", "texture", "appearance", "motion", "depth", "camera_pose", "point_tracking",
         "box_tracking")


@dataclass(frozen=True)
class StudyPreset:
    """Everything that decides a study's numbers."""

    name: str
    about: str
    world: dict  # WorldConfig fields
    splits: dict  # clips per split
    train_preset: str  # walt-train preset (model and autoencoder sizes)
    autoencoder: dict  # --set overrides of the autoencoder stage
    diffusion: dict  # --set overrides of both diffusion runs
    main_block: int  # 0-based block of the main comparison (about 2/3 of the depth)
    main_t: int = 200
    noise_sweep: tuple = (0, 50, 100, 200, 400, 600)
    block_sweep: bool = True  # every block at main_t
    budget_sweep: bool = True  # probes on the kept snapshots
    tasks: tuple = TASKS
    sweep_tasks: tuple = TASKS  # tasks of the noise, block and budget sweeps
    lrs: tuple = (3e-4, 1e-3, 3e-3)
    seeds: tuple = (0, 1, 2)  # readout seeds of the main comparison (sweeps use the first)
    epochs: int = 20
    batch_size: int = 32
    width: int = 64
    seed: int = 0  # noise seed of the feature dumps (training seeds are in the overrides)
    pca_clips: int = 3
    workers: int = 2  # world-rendering processes
    # Seconds each stage took where the preset was measured, for the progress lines' ETA.
    expected_seconds: dict = dataclasses.field(default_factory=dict)


_SMALL_TRAIN = {"train.precision": "fp32", "train.threads": 0, "data.num_workers": 0}

PRESETS = {
    "quick": StudyPreset(
        name="quick",
        about="2-core CPU, under 30 minutes: 32x32 clips, the 4-block CPU model, sweeps on the four fastest tasks",
        world=dict(seed=0, frames=17, height=32, width=32, textures="procedural", track_points=16),
        splits=dict(train=256, val=64, test=96),
        train_preset="cpu",
        autoencoder={**_SMALL_TRAIN, "train.steps": 400, "train.batch_size": 4, "train.lr": 2e-3, "train.warmup_steps": 20,
                     "train.ckpt_every": 100, "train.log_every": 25, "ae_loss.stats_batches": 16},
        diffusion={**_SMALL_TRAIN, "train.steps": 1500, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 50,
                   "train.ema_decay": 0.995, "train.ckpt_every": 250, "train.log_every": 25, "train.num_samples": 8,
                   "train.keep_every": [0.1, 0.2, 0.4, 1.0], "train.match_tokens": True, "train.cache_latents": True,
                   "diffusion.sample_steps": 25},
        main_block=2,
        sweep_tasks=("object", "motion", "camera_pose", "box_tracking"),
        lrs=(1e-3, 3e-3, 1e-2),
        epochs=8,
        batch_size=16,
        # a 2-core Intel Xeon (AVX-512), 2026-12-01
        expected_seconds=dict(data=8, autoencoder=110, iwalt=130, vwalt=125, losses=10, features=140, probes=700,
                              report=5),
    ),
    "gpu": StudyPreset(
        name="gpu",
        about="one GPU (or torchrun for the training stages), hours: 64x64 clips, WALT-S, 2,000 training clips",
        world=dict(seed=0, frames=17, height=64, width=64, textures="procedural", track_points=64),
        splits=dict(train=2000, val=200, test=200),
        train_preset="S",
        autoencoder={"train.steps": 20000, "train.batch_size": 32, "train.lr": 3e-4, "train.warmup_steps": 500,
                     "train.ckpt_every": 1000, "autoencoder.spatial_factor": 4, "autoencoder.channel_mult": [1, 2, 4],
                     "data.num_workers": 4},
        diffusion={"train.steps": 50000, "train.batch_size": 64, "train.lr": 2e-4, "train.warmup_steps": 2000,
                   "train.ckpt_every": 2500, "train.keep_every": [0.1, 0.2, 0.4, 1.0], "train.match_tokens": True,
                   "data.num_workers": 4},
        main_block=7,
        seeds=(0, 1, 2),
        epochs=30,
        lrs=(1e-4, 3e-4, 1e-3, 3e-3),
        width=128,
        workers=8,
    ),
}



class Study:
    def __init__(self, out: str, preset: StudyPreset, progress: bool | None = None):
        self.out, self.p = os.path.abspath(out), preset
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.data = os.path.join(self.out, "data")
        self.runs = {name: os.path.join(self.out, "runs", name) for name in ("ae", "iwalt", "vwalt")}
        self.stage_file = os.path.join(self.out, "stages.json")
        self.stages = {}

    # -- bookkeeping -----------------------------------------------------------------------------
    def _load_stages(self):
        if os.path.exists(self.stage_file):
            with open(self.stage_file) as f:
                saved = json.load(f)
            mine = json.loads(json.dumps(dataclasses.asdict(self.p)))  # as saved: tuples become lists
            if saved.get("preset") != mine:
                raise ValueError(f"{self.out} holds a study of another preset or settings; use a new --out "
                                 f"(differs in {_differing(saved.get('preset', {}), mine)}).")
            self.stages = saved["stages"]

    def _save_stages(self):
        tmp = self.stage_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"preset": dataclasses.asdict(self.p), "stages": self.stages}, f, indent=1, default=str)
        os.replace(tmp, self.stage_file)

    def _stage(self, i, n, name, fn):
        done = self.stages.get(name)
        if done is not None and done.get("complete"):
            log.info("[%d/%d] %s: done earlier (%.0f s), skipped", i, n, name, done["seconds"])
            return
        expected = self.p.expected_seconds
        if name in expected:
            left = sum(v for k, v in expected.items() if not self.stages.get(k, {}).get("complete"))
            eta = time.strftime("%H:%M", time.localtime(time.time() + left))
            log.info("[%d/%d] %s ... (about %s; the study should end near %s)", i, n, name, _duration(expected[name]), eta)
        else:
            log.info("[%d/%d] %s ...", i, n, name)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0 + (done or {}).get("seconds", 0.0)
        self.stages[name] = {"complete": True, "seconds": seconds}
        self._save_stages()
        log.info("[%d/%d] %s: %.0f s", i, n, name, seconds)

    # -- stages ----------------------------------------------------------------------------------
    def make_data(self):
        from walt.data.store import generate
        from walt.data.world import WorldConfig

        generate(self.data, WorldConfig(**self.p.world), dict(self.p.splits), workers=self.p.workers,
                 progress=self.progress)

    def _train(self, stage, name, mode=None):
        from walt.config import resolve
        from walt.train import autoencoder, diffusion
        from walt.train.loop import train

        out = self.runs[name]
        sets = {**(self.p.autoencoder if stage == "autoencoder" else self.p.diffusion),
                "data.kind": "world", "data.path": self.data, "out_dir": out}
        extra = {"stage": stage}
        if mode:
            extra["model"] = {"mode": mode}
            extra["autoencoder_run"] = self.runs["ae"]
        cfg = resolve(self.p.train_preset, sets=[f"{k}={json.dumps(v)}" for k, v in sets.items()], extra=extra)
        resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
        task = autoencoder.make_task if stage == "autoencoder" else diffusion.make_task
        train(cfg, task, resume=resume)

    def diffusion_losses(self):
        """The v-prediction loss on val clips at fixed noise, of the trained, untrained and kept
        snapshot weights: how far training got, for the report."""
        import torch

        from walt import runs
        from walt.data.dataset import ClipDataset
        from walt.data.modes import latents_for
        from walt.data.store import WorldStore
        from walt.diffusion.objective import Diffusion

        val = ClipDataset(WorldStore(self.data, "val"), keys=("video",))
        video = torch.stack([val[i]["video"] for i in range(min(32, len(val)))])
        out = {}
        for name in ("vwalt", "iwalt"):
            run = self.runs[name]
            cfg = runs.run_config(run, "diffusion")
            diffusion = Diffusion(cfg.diffusion)
            with torch.no_grad():  # the same latents and noise for every variant of the run
                x0 = latents_for(cfg.model.mode, runs.load_autoencoder(cfg.autoencoder_run), video)
            keys = torch.arange(len(x0)) + 10**6  # not training keys
            variants = [("trained", {}), ("untrained", {"weights": False})]
            variants += [(f"step {s}", {"step": s}) for s in runs.snapshot_steps(run)]
            row = {}
            for label, kwargs in variants:
                model, _ = runs.load_transformer(run, **kwargs)
                with torch.no_grad():
                    row[label] = float(diffusion.loss(model, x0, seed=12345, keys=keys))
            out[name] = row
        _write_json(os.path.join(self.out, "diffusion_loss.json"), out)

    def feature_sets(self):
        """{name: (run spec, blocks, timesteps, snapshot step)} of every feature file the study uses:
        the noise sweep at the main block, the block sweep at the main t (every other block), the
        controls at the main block and t, and each kept snapshot at the main block and t."""
        from walt import runs

        p = self.p
        sets = {}
        for name in ("vwalt", "iwalt"):
            run = self.runs[name]
            sets[name] = (run, (p.main_block,), tuple(sorted(set(p.noise_sweep) | {p.main_t})), None)
            others = tuple(b for b in range(self._depth()) if b != p.main_block)
            if p.block_sweep and others:
                sets[f"{name}_blocks"] = (run, others, (p.main_t,), None)
            sets[f"random_{name}"] = (f"random:{run}", (p.main_block,), (p.main_t,), None)
            sets[f"latents_{name}"] = (f"latents:{run}", (), (), None)
            if p.budget_sweep:
                final = runs.run_config(run).train.steps
                for step in runs.snapshot_steps(run):
                    if step != final:
                        sets[f"{name}@{step}"] = (run, (p.main_block,), (p.main_t,), step)
        return sets

    def features(self):
        from probes.fit import resolve_device
        from walt.features import dump as D

        device = resolve_device("auto")  # a GPU when there is one, as the dump CLI and the probe fits
        caches = {}  # every dump of a split in one mode sees the same latents: encode each clip once
        for name, (spec, blocks, ts, step) in self.feature_sets().items():
            for split in ("train", "val", "test"):
                out = os.path.join(self.out, "features", name, f"{split}.h5")
                backbone, attrs, size = D.load_backbone(spec, blocks, ts, seed=self.p.seed, step=step, device=device)
                backbone.latent_cache = caches.setdefault((backbone.mode, split), {})
                source, fmt, split_used = D.open_source(self.data, "world", split, frames=size[0])
                clips = D.PreparedClips(source, size)
                attrs.update(data=self.data, data_format=fmt, split=split_used)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                D.dump(out, backbone, clips, attrs, batch_size=8, store_video=split == "test", progress=self.progress)

    def fits(self):
        """Every readout the report needs: dicts of feature set, key, task, seeds, and where the
        result goes (role main / noise / block / budget, model, x)."""
        from walt.features.extract import feature_key

        p = self.p
        jobs = []

        def add(fs, key, task, seeds, role, model, x=None):
            jobs.append(dict(set=fs, key=key, task=task, seeds=seeds, role=role, model=model, x=x))

        main = feature_key(p.main_t, p.main_block)
        snapshots = [fs for fs in self.feature_sets() if "@" in fs] if p.budget_sweep else []
        for name in ("vwalt", "iwalt"):
            for task in p.tasks:
                add(name, main, task, p.seeds, "main", name)
                add(f"random_{name}", main, task, p.seeds, "main", f"random_{name}")
                add(f"latents_{name}", feature_key(None, "latent"), task, p.seeds, "main", f"latents_{name}")
            for task in p.sweep_tasks:
                for t in p.noise_sweep:
                    if t != p.main_t:
                        add(name, feature_key(t, p.main_block), task, p.seeds[:1], "noise", name, t)
                if p.block_sweep:
                    for b in range(self._depth()):
                        if b != p.main_block:
                            add(f"{name}_blocks", feature_key(p.main_t, b), task, p.seeds[:1], "block", name, b)
                for fs in snapshots:
                    if fs.startswith(name + "@"):
                        add(fs, main, task, p.seeds[:1], "budget", name, int(fs.split("@")[1]))
        return jobs

    def _depth(self):
        from walt import runs

        return runs.run_config(self.runs["vwalt"]).model.depth

    def fit_path(self, name, key, task):
        return os.path.join(self.out, "probes", name, key.replace("/", "_"), f"{task}.json")

    def probes(self):
        from tqdm import tqdm

        from probes.features import load_split
        from probes.fit import fit

        p = self.p
        todo = [j for j in self.fits() if not os.path.exists(self.fit_path(j["set"], j["key"], j["task"]))]
        by_features = {}
        for j in todo:  # read each feature once for all its tasks
            by_features.setdefault((j["set"], j["key"]), []).append((j["task"], j["seeds"]))
        bar = tqdm(total=len(todo), desc="probes", unit="fit", disable=not self.progress)
        for (name, key), jobs in by_features.items():
            splits = [load_split(os.path.join(self.out, "features", name, f"{s}.h5"), key)
                      for s in ("train", "val", "test")]
            for task, seeds in jobs:
                result = fit(task, *splits, lrs=p.lrs, seeds=seeds, epochs=p.epochs, batch_size=p.batch_size,
                             width=p.width, progress=False)
                result.update(features=name, key=key)
                _write_json(self.fit_path(name, key, task), result)
                bar.update(1)
        bar.close()

    def collect(self) -> dict:
        """Every number the report needs, from the files the stages left."""
        from walt import runs

        p = self.p
        res = {"preset": dataclasses.asdict(p), "environment": environment(), "stages": self.stages,
               "main": {}, "noise_sweep": {}, "block_sweep": {}, "budget_sweep": {}, "budget_loss": {},
               "curves": {}, "tokens_per_step": {}, "images": {}}
        for j in self.fits():
            path = self.fit_path(j["set"], j["key"], j["task"])
            if not os.path.exists(path):
                continue
            with open(path) as f:
                r = json.load(f)
            if j["role"] == "main":
                res["main"].setdefault(j["task"], {})[j["model"]] = r
                if j["model"] in ("vwalt", "iwalt"):  # the main point of every sweep
                    for role, x in (("noise", p.main_t), ("block", p.main_block)):
                        res[f"{role}_sweep"].setdefault(j["task"], {}).setdefault(j["model"], {})[x] = _score(r)
            else:
                res[f"{j['role']}_sweep"].setdefault(j["task"], {}).setdefault(j["model"], {})[j["x"]] = _score(r)
        for task in list(res["noise_sweep"]):  # sweeps only for the tasks swept
            if task not in p.sweep_tasks:
                for role in ("noise", "block"):
                    res[f"{role}_sweep"].pop(task, None)
        for name in ("ae", "iwalt", "vwalt"):
            recs = _metrics(self.runs[name])
            res["curves"][name] = {"step": [r["step"] for r in recs], "loss": [r["loss"] for r in recs]}
            if name != "ae" and recs:
                res["tokens_per_step"][name] = recs[-1].get("tokens_per_step")
                final = runs.run_config(self.runs[name]).train.steps
                for task in res["budget_sweep"]:  # the final snapshot is the main comparison's model
                    if final in runs.snapshot_steps(self.runs[name]) and name in res["main"].get(task, {}):
                        res["budget_sweep"][task].setdefault(name, {})[final] = _score(res["main"][task][name])
        loss_path = os.path.join(self.out, "diffusion_loss.json")
        if os.path.exists(loss_path):
            with open(loss_path) as f:
                losses = json.load(f)
            res["diffusion_loss"] = {m: {k: v for k, v in d.items() if not k.startswith("step ")} for m, d in losses.items()}
            res["budget_loss"] = {m: {int(k[5:]): v for k, v in d.items() if k.startswith("step ")} for m, d in losses.items()}
        res["images"] = self.figures()
        return res

    def figures(self) -> dict:
        """Samples of both models and the PCA of their features: {caption: path relative to out}."""
        images = {}
        figs = os.path.join(self.out, "figures")
        os.makedirs(figs, exist_ok=True)
        for name in ("vwalt", "iwalt"):
            samples = sorted(f for f in os.listdir(os.path.join(self.runs[name], "samples")) if f.endswith(".png")) \
                if os.path.isdir(os.path.join(self.runs[name], "samples")) else []
            if samples:
                dst = os.path.join(figs, f"samples_{name}.png")
                shutil.copyfile(os.path.join(self.runs[name], "samples", samples[-1]), dst)
                images[f"{'V' if name == 'vwalt' else 'I'}-WALT samples (DDIM, EMA weights, end of training)"] = \
                    os.path.relpath(dst, self.out)
        try:
            images.update(self.pca())
        except Exception as e:  # noqa: BLE001  (the report stands without the picture; say why it is missing)
            log.warning("PCA figure skipped: %s", e)
        return images

    def pca(self) -> dict:
        from walt.cli.probe import pca
        from walt.features.extract import feature_key

        key = feature_key(self.p.main_t, self.p.main_block)
        files = [os.path.join(self.out, "features", name, "test.h5") for name in ("vwalt", "iwalt")]
        clips = partly_moving_clips(self.data, self.p.pca_clips)
        png, gif = (os.path.join(self.out, "figures", f"pca.{ext}") for ext in ("png", "gif"))
        pca.callback(paths=files, key=key, clips=",".join(map(str, clips)), out=png, gif=gif, zoom=0)
        return {f"PCA of the tapped tokens ({key}): the first 3 components as RGB, per clip (test clips {clips}; the "
                "first has a static camera and a moving object). Rows: input frames, V-WALT, I-WALT":
                os.path.relpath(png, self.out)}

    def report(self):
        from probes.report import write_report

        write_report(self.out, self.collect())

    # -- the whole study ---------------------------------------------------------------------------
    def run(self):
        os.makedirs(self.out, exist_ok=True)
        self._load_stages()
        self._save_stages()
        stages = [
            ("data", self.make_data),
            ("autoencoder", lambda: self._train("autoencoder", "ae")),
            ("iwalt", lambda: self._train("diffusion", "iwalt", "image")),
            ("vwalt", lambda: self._train("diffusion", "vwalt", "video")),
            ("losses", self.diffusion_losses),
            ("features", self.features),
            ("probes", self.probes),
            ("report", self.report),
        ]
        self.stages.pop("report", None)  # always rewritten: it is cheap and reads everything above
        for i, (name, fn) in enumerate(stages, 1):
            self._stage(i, len(stages), name, fn)
        return os.path.join(self.out, "report.md")


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _score(fit_result):
    return fit_result["test"]["mean"][fit_result["primary"]]


def _metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def partly_moving_clips(data_dir: str, n: int) -> list[int]:
    """n test clips for the PCA figure, the first one with a static camera and a moving main object
    (only part of the scene moves: the paper's Figure 4)."""
    from walt.data.store import WorldStore
    from walt.data.world import LABEL_NAMES

    store = WorldStore(data_dir, "test")
    names = {k: list(v) for k, v in LABEL_NAMES.items()}
    first = None
    for i in range(len(store)):
        labels = dict(zip(LABEL_NAMES, store.load(i, keys=("labels",))["labels"].tolist()))
        if names["camera"][labels["camera"]] == "static" and names["motion"][labels["motion"]] not in ("still",):
            first = i
            break
    rest = [i for i in range(len(store)) if i != first]
    return ([first] if first is not None else []) + rest[: n - (first is not None)]


def environment() -> dict:
    """Where the numbers came from: the machine, its ISA, torch, walt and its git SHA."""
    import platform

    from walt.features.dump import git_sha
    from walt.info import info

    i = info()
    keep = ("walt", "torch_runtime", "python", "cpu_features", "attention_cpu", "threads", "cuda_available")
    env = {k: i[k] for k in keep}
    env["git_sha"] = git_sha()
    env["processor"] = platform.processor() or platform.machine()
    env["cores"] = os.cpu_count()
    if i["cuda_available"]:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _differing(a: dict, b: dict) -> list:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def preset_with(base: str, **changes) -> StudyPreset:
    """A named preset with some fields replaced (for tests and small experiments)."""
    if base not in PRESETS:
        raise ValueError(f"unknown study preset {base!r}; expected one of {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[base], **changes)


__all__ = ["PRESETS", "Study", "StudyPreset", "TASKS", "preset_with"]
