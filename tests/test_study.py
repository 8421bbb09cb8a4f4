"""The study end to end at miniature size: every stage through the same entry point, the report's
structure and finite values, and resuming (a rerun skips every finished stage and changes nothing)."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from walt.study import Study, preset_with

TINY = {"train.steps": 4, "train.batch_size": 4, "train.warmup_steps": 1, "train.ckpt_every": 2, "train.log_every": 1,
        "model.depth": 2, "model.width": 32, "model.heads": 2, "autoencoder.base_channels": 8, "autoencoder.groups": 8,
        "ae_loss.stats_batches": 1, "train.threads": 1}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    p = preset_with(
        "quick", name="mini", about="a test", world=dict(seed=0, frames=5, height=16, width=16, textures="procedural",
                                                         track_points=4),
        splits=dict(train=8, val=4, test=4), autoencoder=TINY,
        diffusion={**TINY, "train.steps": 5, "train.keep_every": [0.4, 1.0], "train.num_samples": 2,
                   "diffusion.sample_steps": 2},
        main_block=1, noise_sweep=(0, 200), tasks=("object", "texture", "motion", "depth", "camera_pose",
                                                  "point_tracking", "box_tracking"),
        sweep_tasks=("motion",), seeds=(0, 1), lrs=(1e-3, 3e-3), epochs=1, batch_size=4, width=16, pca_clips=2,
        workers=1)
    out = tmp_path_factory.mktemp("study")
    report = Study(str(out), p).run()
    return p, str(out), report


def test_the_report_has_every_part_and_finite_values(mini):
    p, out, report = mini
    text = open(report).read()
    for heading in ("## Answer", "## Per task", "## Controls", "## Noise sweep", "## Block sweep",
                    "## Training-budget sweep", "## Training", "## Environment and wall time"):
        assert heading in text, heading
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["comparison"]) == set(p.tasks)
    for task, row in res["comparison"].items():
        for k in ("iwalt", "vwalt"):
            assert np.isfinite(row[k]), (task, k)
        denominator = row["iwalt"] if row["higher_is_better"] else row["vwalt"]
        assert np.isfinite(row["v_rel_i"]) == (denominator != 0), task  # undefined only against a zero score
        assert row["verdict"] in ("V-WALT better", "I-WALT better", "no clear difference")
    for task, fits in res["main"].items():  # both models and all four controls, each with every seed
        assert set(fits) == {"vwalt", "iwalt", "random_vwalt", "random_iwalt", "latents_vwalt", "latents_iwalt"}
        assert all(len(f["test_per_clip"]) == 2 and len(f["test_per_clip"]["0"]) == 4 for f in fits.values())
    assert set(res["noise_sweep"]["motion"]["vwalt"]) == {"0", "200"}
    assert set(res["block_sweep"]["motion"]["iwalt"]) == {"0", "1"}
    assert set(res["budget_sweep"]["motion"]["vwalt"]) == {"2", "5"}  # the kept snapshots: 40% and 100%
    assert res["tokens_per_step"]["vwalt"] == res["tokens_per_step"]["iwalt"]
    for m in ("vwalt", "iwalt"):
        assert np.isfinite(res["diffusion_loss"][m]["trained"]) and np.isfinite(res["diffusion_loss"][m]["untrained"])
    for name in ("v_vs_i", "noise_sweep", "block_sweep", "budget_sweep", "training_curves", "pca", "samples_vwalt"):
        assert os.path.getsize(os.path.join(out, "figures", f"{name}.png")) > 1000, name


def test_a_rerun_skips_finished_stages_and_reproduces_the_numbers(mini):
    p, out, _ = mini
    before = json.load(open(os.path.join(out, "results.json")))
    stages = json.load(open(os.path.join(out, "stages.json")))["stages"]
    Study(out, p).run()
    after = json.load(open(os.path.join(out, "results.json")))
    assert json.load(open(os.path.join(out, "stages.json")))["stages"]["features"] == stages["features"]
    assert after["comparison"] == before["comparison"]


def test_another_preset_in_the_same_directory_is_refused(mini):
    p, out, _ = mini
    with pytest.raises(ValueError, match="another preset"):
        Study(out, preset_with("quick", name="other")).run()


def test_the_cli_refuses_an_unknown_preset(tmp_path):
    from walt.cli.probe import main

    r = CliRunner().invoke(main, ["study", "--preset", "huge", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--preset must be one of" in r.output


def test_cli_fit_then_eval_reproduces_the_test_scores(mini, tmp_path):
    from walt.cli.probe import main

    _, out, _ = mini
    f = lambda name, split: os.path.join(out, "features", name, f"{split}.h5")  # noqa: E731
    args = ["fit", "--train", f("vwalt", "train"), "--val", f("vwalt", "val"), "--test", f("vwalt", "test"),
            "--key", "t0200/b01", "--tasks", "object,depth,point_tracking", "--lrs", "1e-3,3e-3", "--seeds", "0,1",
            "--epochs", "1", "--batch-size", "4", "--width", "16", "--out", str(tmp_path / "fit")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.load(open(tmp_path / "fit" / "depth.json"))
    assert {"abs_rel", "d1", "rmse"} <= set(res["test"]["mean"]) and len(res["features"]["test_sha256"]) == 64
    assert res["features"]["model"]["kind"] == "walt" and res["features"]["key"] == "t0200/b01"
    r = CliRunner().invoke(main, ["eval", "--readouts", str(tmp_path / "fit"), "--features", f("vwalt", "test"),
                                  "--key", "t0200/b01", "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    again = json.load(open(tmp_path / "eval.json"))
    for task in ("object", "depth", "point_tracking"):
        fitted = json.load(open(tmp_path / "fit" / f"{task}.json"))["test"]["per_seed"]
        for seed, scores in fitted.items():
            for k, v in scores.items():
                assert again[task]["per_seed"][seed][k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), (task, k)


def test_cli_fit_refuses_mixed_models_and_missing_annotations(mini, tmp_path):
    from walt.cli.probe import main

    _, out, _ = mini
    f = lambda name, split: os.path.join(out, "features", name, f"{split}.h5")  # noqa: E731
    base = ["fit", "--train", f("vwalt", "train"), "--test", f("vwalt", "test"), "--key", "t0200/b01",
            "--out", str(tmp_path / "x")]
    r = CliRunner().invoke(main, base + ["--val", f("iwalt", "val")])
    assert r.exit_code == 1 and "mode=" in r.output and "expected" in r.output
    import shutil

    import h5py

    lacking = str(tmp_path / "no_depth.h5")  # a data set without depth annotations
    shutil.copyfile(f("vwalt", "train"), lacking)
    with h5py.File(lacking, "a") as h:
        del h["targets/depth"]
    r = CliRunner().invoke(main, ["fit", "--train", lacking] + base[3:] + ["--val", f("vwalt", "val"), "--tasks", "depth"])
    assert r.exit_code == 1 and "task 'depth' is unavailable: the data has no 'depth'" in r.output
    r = CliRunner().invoke(main, base + ["--val", f("vwalt", "val"), "--key", "t0999/b01"])
    assert r.exit_code == 1 and "has no features 't0999/b01'" in r.output
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("name", ["quick", "gpu"])
def test_every_preset_resolves_to_valid_training_configs(name, tmp_path):
    from walt.config import resolve
    from walt.models import WALT, CausalVAE
    from walt.study import PRESETS

    p = PRESETS[name]
    for stage, sets, mode in (("autoencoder", p.autoencoder, None), ("diffusion", p.diffusion, "image"),
                              ("diffusion", p.diffusion, "video")):
        extra = {"stage": stage, **({"model": {"mode": mode}} if mode else {})}
        cfg = resolve(p.train_preset, sets=[f"{k}={json.dumps(v)}" for k, v in {**sets, "data.kind": "world",
                      "data.path": str(tmp_path), "out_dir": str(tmp_path / "o")}.items()], extra=extra)
        assert cfg.train.match_tokens
    import torch

    with torch.device("meta"):  # the model takes the world's clips: latent grid within its input size
        vae, walt_ = CausalVAE(cfg.autoencoder), WALT(cfg.model)
        z = vae.encode(torch.empty(1, p.world["frames"], 3, p.world["height"], p.world["width"]))
        assert tuple(z.shape[1:4]) <= tuple(cfg.model.input_size) and p.main_block < cfg.model.depth
        walt_(z, torch.zeros(1, dtype=torch.long))


def test_a_study_killed_midway_resumes_to_the_same_numbers(mini, tmp_path, monkeypatch):
    import probes.fit

    p, out, _ = mini
    real, calls = probes.fit.fit, []

    def killed_at_the_fifth_fit(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(probes.fit, "fit", killed_at_the_fifth_fit)
    with pytest.raises(KeyboardInterrupt):
        Study(str(tmp_path), p).run()
    assert not os.path.exists(tmp_path / "report.md")
    monkeypatch.setattr(probes.fit, "fit", real)
    Study(str(tmp_path), p).run()
    assert json.load(open(tmp_path / "results.json"))["comparison"] == json.load(open(os.path.join(out, "results.json")))["comparison"]
