"""The training loop shared by both stages.

A stage supplies a `Task`: the model to train, its dataset and its loss (plus, where it has
them, extra state such as a discriminator and work to do when training ends). The loop owns
everything else: devices and DDP, AdamW with warmup + cosine, clipping, EMA, autocast,
checkpoints and resume, metrics and progress.

Everything random in a step is seeded from (seed, step, rank) and the data order is a function
of the step, so `--resume` continues bit-exactly and the RNG states in the checkpoint are kept
for completeness rather than needed.
"""
import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
import time

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from walt.config import RESUMABLE_CHANGES, diff, to_dict, to_yaml, validate
from walt.diffusion.objective import mix_seed
from walt.runs import autoencoder_config, snapshot_path
from walt.train import checkpoint as ckpt
from walt.train import distributed
from walt.train.data import StepBatches, collate
from walt.train.schedule import lr_factor

log = logging.getLogger("walt.train")


class Task:
    """What a stage gives the loop: `model`, `dataset`, `loss` and `tokens`; the other hooks do nothing
    unless a stage has work for them."""

    model: torch.nn.Module
    dataset: torch.utils.data.Dataset
    batch_size = None  # examples per step when not train.batch_size (I-WALT with matched tokens: frames)
    collate = staticmethod(collate)

    def loss(self, model, batch, step, keys, raw):
        """(loss, logs) of one (micro-)batch: `model` is the module being trained, possibly wrapped in DDP
        and torch.compile; `raw` is the same module unwrapped, for passes that must not go through them."""
        raise NotImplementedError

    def tokens(self, batch):
        """The tokens (or pixels) of one step's batch on this rank, for throughput."""
        raise NotImplementedError

    def after_step(self, batch, step):
        """Work after the optimizer step (a discriminator's update); returns logs."""
        return {}

    def extra_state(self):
        """State of the stage's own to checkpoint (a discriminator and its optimizer)."""
        return {}

    def load_extra_state(self, state):
        pass

    def sample(self, model, step, out_dir):
        pass

    def finish(self, model, ema, step, out_dir):
        """At the last step, before its checkpoint (latent statistics, final samples)."""
        pass


class NonFiniteLoss(RuntimeError):
    pass


# Exit status of `walt-train` when a signal (SIGTERM, SIGUSR1) stopped it after a checkpoint.
EXIT_INTERRUPTED = 3


class Interrupted(RuntimeError):
    """A scheduler's signal stopped training after a checkpoint; `--resume` continues it."""

    def __init__(self, out, step, steps, signum):
        self.out, self.step, self.steps, self.signum = out, step, steps, signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step} of {steps}: the checkpoint "
                         f"{os.path.join(out, 'checkpoint.pt')} is written; continue with the same command and --resume")


class RunInUse(FileExistsError):
    pass


# A run directory is what it resolves to: the same run named another way (./runs/x, an absolute
# path) or moved elsewhere resumes, so out_dir is never compared.
_NOT_COMPARED = {"out_dir"}


def _same_dir(a, b):
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b))


def resume_differences(saved, cfg):
    """Settings of config dict `saved` that a resume of `cfg` may not change, as 'key: X there, Y here'."""
    now = to_dict(cfg)
    out = []
    for key in diff(saved, now):
        if key in RESUMABLE_CHANGES or key in _NOT_COMPARED:
            continue
        there, here = _lookup(saved, key), _lookup(now, key)
        if key == "autoencoder_run" and _same_dir(there, here):
            continue
        out.append((key, there, here))
    return out


def _lookup(d, dotted):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _describe(differences):
    return "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in differences)


def _check_run_dir(cfg, out, resume):
    """The checks on an existing run directory (read-only, so every rank can make them)."""
    ckpt_path, cfg_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "config.yaml")
    if resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"cannot resume {out}: it holds no checkpoint.pt; run without --resume to start a new run")
    if resume and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            try:
                saved = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"cannot resume {out}: {cfg_path} is not valid YAML ({str(e).splitlines()[0]})") from None
        changed = resume_differences(saved if isinstance(saved, dict) else {}, cfg)
        if changed:
            raise ValueError(f"cannot resume {out}: the config differs from the saved run in {[k for k, _, _ in changed]} "
                             f"({_describe(changed)})")
    elif not resume and os.path.exists(ckpt_path):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def lock_run_dir(out):
    """An advisory lock (flock) on <out>/.lock for as long as the returned descriptor is open: a second
    writer of the same run directory (under any name) is refused with the holder's pid."""
    path = os.path.join(out, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunInUse(f"{out} is in use by another walt-train process (pid {holder}); wait for it to end or choose "
                       f"another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lr_lambda(tc):
    # A plain function: LambdaLR then stores only its step, keeping checkpoints pickle-free.
    def factor(step):
        return lr_factor(step, tc.warmup_steps, tc.steps, tc.min_lr_ratio)

    return factor


def _setup_logging(out_dir, main):
    root = logging.getLogger("walt")
    root.setLevel(logging.INFO if main else logging.WARNING)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if main:
        fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def make_optimizer(model, tc):
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' vectors).

    fused=True runs one kernel per step (CPU and CUDA) instead of a dozen elementwise ops per
    parameter: on the small CPU preset the per-parameter loop costs as much as the model.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tuple(tc.betas),
        fused=True,
    )


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def snapshot_steps(keep_every, total):
    """The steps `train.keep_every` names: floats are fractions of `total`, integers steps."""
    steps = set()
    for k in keep_every:
        if isinstance(k, float):
            if not 0 < k <= 1:
                raise ValueError(f"train.keep_every fractions must be in (0, 1], got {k}")
            steps.add(max(1, round(k * total)))
        elif not 0 < k <= total:
            raise ValueError(f"train.keep_every steps must be in [1, train.steps={total}], got {k}")
        else:
            steps.add(int(k))
    return steps


def _stop(stage, what, value, step, ckpt_path, last_saved):
    where = f"{ckpt_path} (step {last_saved})" if last_saved is not None else "none was written yet"
    raise NonFiniteLoss(
        f"the {stage} {what} became non-finite ({value.item()}) at step {step}; stopping. "
        f"The last good checkpoint is {where}; lower train.lr or check the data before resuming."
    )


def _check_checkpoint_config(state, cfg, ckpt_path):
    """A checkpoint carries the config of the run that wrote it: refuse one from another run (an
    I-WALT checkpoint copied into a V-WALT run, another architecture) before loading any weights."""
    text = state.get("config")
    if not isinstance(text, str):
        return  # written before checkpoints carried their config; load_state_dict still checks shapes
    try:
        saved = yaml.safe_load(text)
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume: the config stored in {ckpt_path} is unreadable; the checkpoint is damaged")
    changed = resume_differences(saved, cfg)
    if changed:
        raise ValueError(f"cannot resume: {ckpt_path} was written by a different run, whose config differs in "
                         f"{[k for k, _, _ in changed]} ({_describe(changed)})")


def train(cfg, make_task, resume=False, stop_after=None):
    """Run (or continue) the training described by `cfg`; returns the output directory.

    make_task(cfg, dist) -> task. stop_after ends this invocation after that many steps with a
    checkpoint (for time-sliced jobs); `resume` continues from <out_dir>/checkpoint.pt. The config
    is validated and the task built before anything is written; the run directory is locked
    while training (RunInUse for a second writer). SIGTERM/SIGUSR1 write a checkpoint and raise
    Interrupted.
    """
    validate(cfg)
    if cfg.stage == "diffusion" and cfg.autoencoder_run:
        # Record the autoencoder actually used, not the preset's, in the run's config.
        cfg = dataclasses.replace(cfg, autoencoder=autoencoder_config(cfg.autoencoder_run))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    dist = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, make_task, dist, resume, stop_after)
    finally:
        distributed.teardown()


def _train(cfg, make_task, dist, resume, stop_after):
    out = cfg.out_dir
    # Every rank checks (read-only), so a refusal cannot leave the others waiting at a barrier.
    _check_run_dir(cfg, out, resume)
    # The task (data, autoencoder) is built before anything is written: a bad data path or
    # autoencoder run leaves --out untouched.
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    task = make_task(cfg, dist)
    lock = None
    refused = None
    if dist.main:
        try:
            os.makedirs(out, exist_ok=True)
            lock = lock_run_dir(out)
            _check_run_dir(cfg, out, resume)  # again, now that no one else can write here
        except (OSError, ValueError) as e:
            refused = e
    if distributed.all_reduce_sum(torch.tensor([1.0 if refused else 0.0], device=dist.device)).item() > 0:
        if lock is not None:
            os.close(lock)
        raise refused if refused is not None else RunInUse(f"{out} could not be claimed by rank 0; see its error")
    try:
        return _train_locked(cfg, task, dist, resume, stop_after)
    finally:
        if lock is not None:
            os.close(lock)


def _train_locked(cfg, task, dist, resume, stop_after):
    tc, out, device = cfg.train, cfg.out_dir, dist.device
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if dist.main:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    distributed.barrier()
    _setup_logging(out, dist.main)
    state, train_model = _build(task, tc, dist)
    model, ema = state.model, state.ema
    start = _resume(state, cfg, ckpt_path) if resume else 0
    log.info("%s stage: %.2fM parameters, %d steps, global batch %d on %d x %s", cfg.stage,
             sum(p.numel() for p in model.parameters()) / 1e6, tc.steps, tc.batch_size, dist.world, device)
    sampler, loader = _data(task, cfg, dist, start)
    keep = snapshot_steps(tc.keep_every, tc.steps) if ema is not None else set()
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    last_saved = start if resume else None

    def stop(what, value, step):
        _stop(cfg.stage, what, value, step, ckpt_path, last_saved)

    bar = tqdm(total=end - start, desc=cfg.stage, disable=not (dist.main and sys.stderr.isatty()), dynamic_ncols=True)
    with bar, _Metrics(out, start, dist, tc.tensorboard) as metrics, _StopSignals() as signals:
        it = iter(loader)
        step = start
        while step < end:
            batch = next(it).to(device, non_blocking=True)
            loss, grad_norm, logs = _train_step(state, train_model, batch, sampler.keys(step), step, cfg, dist, stop)
            step += 1
            bar.update(1)
            step_tokens = task.tokens(batch) * dist.world  # tokens (diffusion) or pixels (autoencoder)
            metrics.count(step_tokens)
            if step in keep and dist.main:  # EMA snapshots for the training-budget sweep
                os.makedirs(os.path.join(out, "snapshots"), exist_ok=True)
                ckpt.export_safetensors(snapshot_path(out, step), ema, {"config": to_yaml(cfg), "step": str(step)})
            if step % tc.log_every == 0 or step == end:
                mean_loss = distributed.all_reduce_sum(loss.detach().float().clone()).item() / dist.world
                metrics.write(step, mean_loss, state.sched.get_last_lr()[0], float(grad_norm), step_tokens, logs)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                task.sample(ema if ema is not None else model, step, out)
            if step % tc.ckpt_every == 0 or step == end:
                if step == tc.steps:
                    task.finish(model, ema, step, out)
                _save(state, step, cfg, ckpt_path, dist)
                last_saved = step
            if step < end and signals.received_on_any_rank(device):
                _save(state, step, cfg, ckpt_path, dist)
                log.warning("stop requested by signal: checkpoint at step %d written; continue with --resume", step)
                raise Interrupted(out, step, tc.steps, signals.signum)
    if step == tc.steps:
        if start == tc.steps:  # resumed a finished run: nothing to do but re-export
            log.info("%s is already trained to step %d", out, step)
        _export(out, cfg, model, ema, step, dist)
    else:
        log.info("stopped at step %d of %d; continue with --resume", step, tc.steps)
    return out


@dataclasses.dataclass
class _State:
    """Everything a checkpoint restores besides the step and the RNG."""
    model: torch.nn.Module
    ema: torch.nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    task: Task


def _build(task, tc, dist):
    """The training state on this rank's device, and the module the steps run: the model in DDP when
    distributed, compiled with train.compile."""
    device = dist.device
    model = task.model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if tc.ema_decay > 0 else None
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    if tc.compile:
        train_model = torch.compile(train_model)
    opt = make_optimizer(model, tc)
    return _State(model, ema, opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc)), task), train_model


def _data(task, cfg, dist, start):
    """This rank's batches from step `start` on: (the sampler, which also gives each batch's keys, the loader)."""
    tc = cfg.train
    batch_size = task.batch_size or tc.batch_size  # examples per step (I-WALT: frames)
    if tc.grad_accum < 1 or batch_size % (dist.world * tc.grad_accum):
        raise ValueError(f"train.batch_size {tc.batch_size} must be divisible by processes x train.grad_accum "
                         f"({dist.world} x {tc.grad_accum})")
    sampler = StepBatches(len(task.dataset), batch_size, tc.seed, start, dist.rank, dist.world)
    loader = torch.utils.data.DataLoader(
        task.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=task.collate,
        pin_memory=dist.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
    )
    return sampler, loader


def _save(state, step, cfg, path, dist):
    if dist.main:
        ckpt.save(path, {
            "step": step,
            "model": state.model.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else {},
            "optimizer": state.opt.state_dict(),
            "scheduler": state.sched.state_dict(),
            "extra": state.task.extra_state(),
            "rng": ckpt.rng_state(),
            "config": to_yaml(cfg),
        })
    distributed.barrier()


def _resume(state, cfg, path):
    """Load the checkpoint at `path` into `state` and return its step; a checkpoint of another run or
    model is refused in one sentence."""
    saved = ckpt.load(path)  # on CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    _check_checkpoint_config(saved, cfg, path)
    try:
        state.model.load_state_dict(saved["model"])
        if state.ema is not None:
            state.ema.load_state_dict(saved["ema"])
        state.opt.load_state_dict(saved["optimizer"])
        state.sched.load_state_dict(saved["scheduler"])
        state.task.load_extra_state(saved["extra"])
        ckpt.set_rng_state(saved["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        detail = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = detail[1] if len(detail) > 1 and detail[0].startswith("Error(s) in loading") else (detail or [repr(e)])[0]
        raise ValueError(f"cannot resume {cfg.out_dir}: {path} does not fit the configured {cfg.stage} model "
                         f"({detail[:200]})") from None
    log.info("resumed %s at step %d", cfg.out_dir, saved["step"])
    return saved["step"]


def _train_step(state, train_model, batch, keys, step, cfg, dist, stop):
    """One optimizer step on this rank's share of the batch; returns (mean loss, gradient norm, logs).

    Gradient accumulation runs equal micro-batches of the share and syncs gradients on the last:
    the same examples and draws as one big step, so only memory changes.
    """
    tc, device = cfg.train, dist.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and tc.precision == "bf16")
    torch.manual_seed(mix_seed(tc.seed, step, dist.rank))
    state.opt.zero_grad(set_to_none=True)
    loss = 0.0
    for i, (micro, micro_keys) in enumerate(zip(batch.chunk(tc.grad_accum), keys.chunk(tc.grad_accum))):
        sync = not dist.enabled or i == tc.grad_accum - 1
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with autocast:
                micro_loss, logs = state.task.loss(train_model, micro, step, micro_keys, raw=state.model)
            flag = torch.tensor([0.0 if torch.isfinite(micro_loss.detach()) else 1.0], device=device)
            if distributed.all_reduce_sum(flag).item() > 0:
                stop("loss", micro_loss, step)
            (micro_loss / tc.grad_accum).backward()
        loss = loss + micro_loss.detach() / tc.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):  # gradients are all-reduced: every rank sees the same norm
        stop("gradient norm", grad_norm, step)
    state.opt.step()
    state.sched.step()
    if state.ema is not None:
        ema_update(state.ema, state.model, min(tc.ema_decay, (1 + step) / (10 + step)))
    logs.update(state.task.after_step(batch, step))
    return loss, grad_norm, logs


class _Metrics:
    """metrics.jsonl and, with train.tensorboard, TensorBoard scalars, written by rank 0; every rank
    counts tokens for the throughput of each logged window."""

    def __init__(self, out, start, dist, tensorboard):
        self.main, self.file, self.tb = dist.main, None, None
        self.window_t, self.window_tokens = time.perf_counter(), 0
        if not self.main:
            return
        path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(path):
            # Drop records of steps after the checkpoint (a crash between checkpoints): they are redone.
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
            with open(path, "w") as f:
                f.writelines(kept)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except ImportError:
                log.warning("train.tensorboard is set but tensorboard is not installed; logging to metrics.jsonl only")

    def count(self, tokens):
        self.window_tokens += tokens

    def write(self, step, loss, lr, grad_norm, tokens_per_step, logs):
        """One record, with the throughput since the last one."""
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_step": tokens_per_step,
               "tokens_per_s": self.window_tokens / (time.perf_counter() - self.window_t),
               **{k: float(v) for k, v in logs.items()}}
        self.window_t, self.window_tokens = time.perf_counter(), 0
        if not self.main:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        log.info("step %d loss %.5f lr %.2e grad %.3f", step, loss, lr, grad_norm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class _StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's preemption) are recorded instead of ending the process, so
    the loop can checkpoint the step and stop; the previous handlers are put back on exit."""

    def __enter__(self):
        self.received, self.previous = [], {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def received_on_any_rank(self, device):
        """Whether a signal reached any rank (an all-reduce: every rank asks at the same step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        return distributed.all_reduce_sum(flag).item() > 0

    @property
    def signum(self):
        return self.received[0] if self.received else signal.SIGTERM  # another rank's signal


def _export(out, cfg, model, ema, step, dist):
    """The trained weights (and the EMA's) as safetensors, next to the checkpoint."""
    if dist.main:
        meta = {"config": to_yaml(cfg), "step": str(step)}
        ckpt.export_safetensors(os.path.join(out, "model.safetensors"), model, meta)
        if ema is not None:
            ckpt.export_safetensors(os.path.join(out, "ema.safetensors"), ema, meta)
        log.info("exported weights to %s", out)
    distributed.barrier()
