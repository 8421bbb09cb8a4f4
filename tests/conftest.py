"""What the test modules share: one-thread runs, tiny training runs, child processes that import the
walt under test, and the tiny runs and world store of the feature tests."""
import json
import os
import subprocess
import sys

import pytest
import torch

import walt
from walt.config import RunConfig, merge, resolve, to_yaml
from walt.data.store import generate
from walt.data.world import WorldConfig
from walt.models import CausalVAE
from walt.train import checkpoint
from walt.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: pyproject.toml, configs/
WALT_ROOT = os.path.dirname(os.path.dirname(walt.__file__))  # where the walt under test is imported from

TINY_AE = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, spatial_factor=4, temporal_factor=4, groups=8)


@pytest.fixture
def one_thread():
    """The test models are tiny: one intra-op thread is as fast, and far steadier on a shared CPU.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_ae_run(out_dir):
    """A tiny (untrained) autoencoder run directory, as `walt-train autoencoder` leaves one."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = merge(RunConfig(), {"stage": "autoencoder", "autoencoder": TINY_AE})
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    torch.manual_seed(0)
    vae = CausalVAE(cfg.autoencoder)
    for mode in ("video", "image"):
        vae.set_latent_stats(mode, torch.zeros(8), torch.full((8,), 0.5))
    checkpoint.export_safetensors(os.path.join(out_dir, "model.safetensors"), vae)
    return str(out_dir)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    return make_ae_run(tmp_path_factory.mktemp("ae"))


def tiny_sets(out_dir, ae_run=None, steps=6, **extra):
    """`--set` overrides of a run small enough for a test: a 2-block model on 8 clips of 5 x 16 x 16."""
    sets = {
        "out_dir": str(out_dir),
        "model.depth": 2, "model.width": 32, "model.heads": 2,
        "data.num_clips": 8, "data.frames": 5, "data.size": 16,
        "train.steps": steps, "train.batch_size": 4, "train.ckpt_every": 3, "train.log_every": 1,
        "train.num_samples": 2, "diffusion.sample_steps": 4, "ae_loss.stats_batches": 2,
    }
    if ae_run:
        sets["autoencoder_run"] = ae_run
    sets.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]


def run(stage, sets, resume=False, stop_after=None):
    """Train `stage` on the cpu preset with `sets`, in this process; returns the run directory."""
    from walt.train import autoencoder, diffusion

    cfg = resolve("cpu", sets=sets, extra={"stage": stage})
    task = autoencoder.make_task if stage == "autoencoder" else diffusion.make_task
    return train(cfg, task, resume=resume, stop_after=stop_after)


def child_env(**extra):
    """The environment of a child Python that imports the walt under test."""
    return {**os.environ, "PYTHONPATH": WALT_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_python(*args, timeout=300, **extra_env):
    """`python *args` in a child process that imports the walt under test; output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=WALT_ROOT, env=child_env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


_WRITE_LIMITED = """
import resource, sys
if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a write past `limit` bytes fails (EFBIG)
    from walt.cli.{cli} import main
    main(sys.argv[2:], prog_name="walt-{cli}")
"""


def run_with_file_size_limit(tmp_path, limit, cli, args):
    """walt-`cli` ("data", "train" or "probe") with `args` in a child process that cannot write past `limit`
    bytes per file: a full disk, simulated."""
    script = tmp_path / f"limited_{cli}.py"
    script.write_text(_WRITE_LIMITED.format(cli=cli))
    return run_python(str(script), str(limit), *args, timeout=600)


def make_tiny_runs(root):
    """A tiny autoencoder, a V-WALT and an I-WALT trained 2 steps on 5 x 16 x 16 clips, and a world
    store of 6 test clips of 5 x 32 x 32 (resized to 16 x 16 by dumps)."""
    root = str(root)
    ae = make_ae_run(os.path.join(root, "ae"))
    v = run("diffusion", tiny_sets(os.path.join(root, "v"), ae, steps=2))
    i = run("diffusion", tiny_sets(os.path.join(root, "i"), ae, steps=2, **{"model.mode": "image"}))
    world = os.path.join(root, "world")
    generate(world, WorldConfig(frames=5, height=32, width=32, track_points=8, textures="procedural"), {"test": 6},
             workers=1, progress=False)
    return {"ae": ae, "video": str(v), "image": str(i), "world": world}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_runs(tmp_path_factory.mktemp("runs"))
    finally:
        torch.set_num_threads(n)
