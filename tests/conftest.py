"""Fixtures shared by test modules: tiny trained runs and a world store for the feature tests."""
import os

import pytest
import torch

from test_train import make_ae_run, run, tiny_sets
from walt.data.store import generate
from walt.data.world import WorldConfig


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
