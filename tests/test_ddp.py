"""2-process gloo DDP under torchrun matches one process with the same global batch."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_ae_run, run_python, tiny_sets


def _walt_train(args, nproc=None):
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    res = run_python(*torchrun, "-m", "walt.cli.train", *args, OMP_NUM_THREADS="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_process_gloo_matches_one_process(tmp_path):
    ae = make_ae_run(tmp_path / "ae")
    sets = lambda name: [a for s in tiny_sets(tmp_path / name, ae, steps=4) for a in ("--set", s)]  # noqa: E731
    _walt_train(["diffusion"] + sets("one"))
    out = _walt_train(["diffusion"] + sets("two"), nproc=2)
    assert "on 2 x cpu" in out.stdout + out.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    # the zero-initialized output layer has moved: the match is not trivially the initialization
    assert load_file(tmp_path / "one" / "model.safetensors")["final_proj.weight"].abs().amax() > 0
    losses = [[json.loads(x)["loss"] for x in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two")]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
