"""Fitting readouts on cached features: a grid of learning rates x readout seeds in one pass.

Every (learning rate, seed) pair is one member of a readout group (``probes.readouts``): all of
them see the same batches in the same order, the features of a batch are read, converted and
normalised once, and one backward pass gives every member its own gradient (their losses are
summed; members share no parameter). AdamW (weight decay 0.05 on weight matrices) with a
per-member learning rate, linear warmup then cosine decay to zero. The best learning rate is
chosen per seed on val by the task's primary metric and evaluated on test.

Data: a dict of arrays for a split (``features`` (N, T', h, w, C) float16/32, ``frame_index``
(T',), the task's targets, optionally ``label_names`` and ``image_size``), or any object with
``__len__`` and ``get_batch(indices) -> dict`` (features and targets of those clips) and
attributes ``frame_index`` (and optionally ``label_names``, ``image_size``), so a large feature
file can be streamed.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from probes.readouts import normalize_features
from probes.tasks import Task, get_task
from walt.heap import reused_heap
from walt.train.schedule import lr_factor

__all__ = ["ArraySource", "as_source", "GroupAdamW", "fit", "predict", "resolve_device"]

_META = ("frame_index", "label_names", "image_size")


class ArraySource:
    """A split held in memory: a dict of arrays (nested ``labels`` dicts become 'labels/<task>')."""

    def __init__(self, data: dict):
        self.data = {}
        for k, v in data.items():
            if k == "labels" and isinstance(v, dict):
                self.data.update({f"labels/{t}": x for t, x in v.items()})
            else:
                self.data[k] = v
        if "features" not in self.data:
            raise ValueError("the data has no 'features' (expected (N, T', h, w, C) cached features)")
        self.n = len(self.data["features"])
        for k in _META:
            if k in self.data:
                setattr(self, k, self.data[k])

    def __len__(self):
        return self.n

    def get_batch(self, idx):
        out = {}
        for k, v in self.data.items():
            if k in _META or not hasattr(v, "shape") or len(v.shape) == 0 or v.shape[0] != self.n:
                continue
            out[k] = v[idx]
        return out


def as_source(data):
    if hasattr(data, "get_batch") and hasattr(data, "__len__"):
        return data
    if isinstance(data, dict):
        return ArraySource(data)
    raise TypeError(f"data must be a dict of arrays or have __len__ and get_batch(indices), got {type(data).__name__}")


def _meta(src):
    return {k: getattr(src, k) for k in _META if getattr(src, k, None) is not None}


def _torch_batch(b):
    return {k: (v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v))) for k, v in b.items()}


def _on(batch: dict, device: torch.device) -> dict:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resolve_device(device="auto") -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:1' or a torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device")
    return dev


def _view(src, n=None):
    """A dict standing for a split (all clips, or the first n) to infer specs and check keys."""
    if isinstance(src, ArraySource) and n is None:
        return dict(src.data)
    idx = np.arange(len(src) if n is None else min(n, len(src)))
    return {**_meta(src), **src.get_batch(idx)}


class GroupAdamW:
    """AdamW (Loshchilov & Hutter; the update of ``torch.optim.AdamW``) for parameters with a
    leading member axis, each member with its own learning rate ``lrs`` (G,)."""

    def __init__(self, params: dict, lrs, decay: dict, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8):
        self.params = params
        device = next(iter(params.values())).device
        self.lrs = torch.as_tensor(lrs, dtype=torch.float64).to(device)
        self.decay, self.wd, self.betas, self.eps = decay, weight_decay, betas, eps
        self.state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, factor: float):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        lr = (self.lrs * factor).float()
        for n, p in self.params.items():
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr_p = lr.view(shape)
            if self.decay[n] and self.wd:
                p.mul_(1 - lr_p * self.wd)
            m, v = self.state[n]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.sub_((lr_p / bc1) * m / denom)
            p.grad = None


def _progress(total, desc, progress):
    from tqdm.auto import tqdm
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


@torch.no_grad()
def predict(task: Task, readout, source, spec, batch_size=64, progress=None):
    """Outputs of every member for a whole split, numpy with a leading G axis (a tuple for
    point tracking), and the split's targets gathered from the same batches. Runs on the
    readout's device."""
    src = as_source(source)
    device = next(readout.parameters()).device
    fi = torch.as_tensor(np.asarray(src.frame_index), dtype=torch.long).to(device)
    outs, targets = [], {}
    n = len(src)
    bar = _progress(n, f"eval {task.name}", progress)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        b = _torch_batch(src.get_batch(idx))
        d = _on(b, device)
        y = readout(normalize_features(d["features"]), fi, *task.inputs(d), normalized=True, hw=spec["grid"])
        if readout.single:
            y = tuple(t[None] for t in y) if isinstance(y, tuple) else y[None]
        outs.append(tuple(t.cpu().numpy() for t in y) if isinstance(y, tuple) else y.cpu().numpy())
        for k in task.target_keys:
            targets.setdefault(k, []).append(b[k].numpy())
        bar.update(len(idx))
    bar.close()
    if isinstance(outs[0], tuple):
        out = tuple(np.concatenate([o[i] for o in outs], axis=1) for i in range(len(outs[0])))
    else:
        out = np.concatenate(outs, axis=1)
    return out, {k: np.concatenate(v) for k, v in targets.items()}


def _member(out, g):
    return tuple(o[g] for o in out) if isinstance(out, tuple) else out[g]


@reused_heap()
def fit(task, train, val, test, *, lrs=(1e-4, 3e-4, 1e-3, 3e-3), seeds=(0,), epochs=10, batch_size=32,
        warmup=0.1, weight_decay=0.05, width=64, heads=4, data_seed=0, eval_batch_size=64,
        progress=None, return_readout=False, device="auto"):
    """Train a grid of ``lrs`` x ``seeds`` readouts together; choose the lr per seed on val.

    ``device``: where the readouts train ('auto': a GPU when there is one, else the CPU); the
    features stay where the source keeps them and travel a batch at a time.

    Returns a JSON-ready dict: task, primary, higher_is_better, lrs, seeds, steps, spec,
    ``chosen_lr`` {seed: lr}, ``val`` [{lr, seed, score, train_loss}] for every member,
    ``test`` {"per_seed": {seed: {metric: value}}, "mean": {...}, "std": {...}} at the chosen lrs,
    and ``test_per_clip`` {seed: [primary metric per test clip]} for bootstrap intervals
    (``readout`` too, on the CPU, with return_readout=True). Deterministic given seeds, data_seed
    and the device.
    """
    task = get_task(task) if isinstance(task, str) else task
    dev = resolve_device(device)
    srcs = {name: as_source(d) for name, d in (("train", train), ("val", val), ("test", test))}
    for name, src in srcs.items():
        probe = _view(src, 1)
        why = task.missing(probe)
        if why:
            raise ValueError(f"{why} in the {name} split")
    spec = task.spec(_view(srcs["train"]))
    members = [(float(lr), int(s)) for lr in lrs for s in seeds]
    readout = task.build(spec, width=width, heads=heads, seeds=[s for _, s in members]).to(dev)
    params = dict(readout.named_parameters())
    opt = GroupAdamW(params, [lr for lr, _ in members], readout.decay_mask(), weight_decay)

    src = srcs["train"]
    n = len(src)
    per_epoch = max(1, n // batch_size)
    total = epochs * per_epoch
    warm = max(1, round(warmup * total))
    fi = torch.as_tensor(np.asarray(src.frame_index), dtype=torch.long).to(dev)
    rng = np.random.default_rng(data_seed)
    last = torch.zeros(len(members))
    bar = _progress(total, f"fit {task.name} x{len(members)}", progress)
    step = 0
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(per_epoch):
            idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
            b = _on(_torch_batch(src.get_batch(idx)), dev)
            xhat = normalize_features(b["features"])
            out = readout(xhat, fi, *task.inputs(b), normalized=True, hw=spec["grid"])
            if readout.single:
                out = tuple(t[None] for t in out) if isinstance(out, tuple) else out[None]
            losses = task.loss(out, b, spec)
            losses.sum().backward()
            opt.step(lr_factor(step, warm, total))
            last = losses.detach()
            step += 1
            bar.update(1)
    bar.close()
    last = last.cpu()

    sign = 1.0 if task.higher_is_better else -1.0
    val_out, val_t = predict(task, readout, srcs["val"], spec, eval_batch_size, progress)
    test_out, test_t = predict(task, readout, srcs["test"], spec, eval_batch_size, progress)
    val_rows, best = [], {}
    for g, (lr, s) in enumerate(members):
        score = task.primary_score(_member(val_out, g), val_t, spec)
        val_rows.append({"lr": lr, "seed": s, "score": score, "train_loss": float(last[g])})
        key = sign * score if np.isfinite(score) else -np.inf
        if s not in best or key > best[s][0]:
            best[s] = (key, g)
    per_seed, per_clip = {}, {}
    for s, (_, g) in best.items():
        clip = task.metrics(_member(test_out, g), test_t, spec)
        per_seed[str(s)] = task.score(clip)
        per_clip[str(s)] = [float(v) for v in np.asarray(clip[task.primary], dtype=np.float64)]
    names = list(next(iter(per_seed.values())))
    result = {
        "task": task.name, "primary": task.primary, "higher_is_better": task.higher_is_better,
        "lrs": [float(x) for x in lrs], "seeds": [int(x) for x in seeds], "steps": total, "device": dev.type,
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()},
        "chosen_lr": {str(s): members[g][0] for s, (_, g) in best.items()},
        "val": val_rows,
        "test": {
            "per_seed": per_seed,
            "mean": {k: float(np.mean([per_seed[s][k] for s in per_seed])) for k in names},
            "std": {k: float(np.std([per_seed[s][k] for s in per_seed])) for k in names},
        },
        "test_per_clip": per_clip,
    }
    if return_readout:
        result["readout"] = readout.cpu()
    return result
