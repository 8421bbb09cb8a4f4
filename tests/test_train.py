"""The trainers: overfitting, bit-exact resume, non-finite stop, image mode, config layering, CLI."""
import json
import os
import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import TINY_AE, run, run_python, run_with_file_size_limit, tiny_sets
from walt import runs
from walt.cli.train import main as cli
from walt.config import ConfigError, resolve, to_yaml
from walt.data.dataset import FrameDataset
from walt.data.synthetic import MovingShapes
from walt.diffusion import Diffusion, DiffusionConfig
from walt.models import TRANSFORMER_PRESETS, WALT, TransformerConfig
from walt.train.data import StepBatches
from walt.train.loop import EXIT_INTERRUPTED, Interrupted, NonFiniteLoss, RunInUse, lock_run_dir
from walt.train.schedule import lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(out, name="model.safetensors"):
    return load_file(os.path.join(out, name))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_model_overfits_a_tiny_set():
    torch.manual_seed(0)
    model = WALT(TransformerConfig(**{**TRANSFORMER_PRESETS["cpu"], "depth": 2, "width": 64, "heads": 4}))
    diffusion = Diffusion(DiffusionConfig())
    x0 = torch.randn(2, 1, 4, 4, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    losses = []
    for _ in range(60):  # the same two noisy examples every step
        loss = diffusion.loss(model, x0, seed=0, keys=torch.arange(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize("mode,backend", [("video", "torch"), ("image", "torch"), ("video", "fused")])
def test_diffusion_resume_is_bit_exact(tmp_path, ae_run, mode, backend):
    over = {"model.mode": mode, "model.attention_backend": backend, "diffusion.noise_backend": backend}
    full = run("diffusion", tiny_sets(tmp_path / "full", ae_run, **over))
    part = tiny_sets(tmp_path / "part", ae_run, **over)
    run("diffusion", part, stop_after=4)  # interrupted after step 4 (checkpoint at 3 and at the stop)
    assert not os.path.exists(tmp_path / "part" / "model.safetensors")
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 4
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a crash after logging step 5, before its checkpoint
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
    run("diffusion", part, resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(weights(full, name), weights(tmp_path / "part", name))
    a = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert (tmp_path / "full" / "samples" / "step_000006.png").exists()
    assert (tmp_path / "full" / "samples" / "step_000006.mp4").exists() == (mode == "video")
    saved = yaml.safe_load(open(tmp_path / "full" / "config.yaml"))
    assert saved["model"]["mode"] == mode and saved["train"]["steps"] == 6
    model, cfg = runs.load_transformer(full)  # the feature-dump path: EMA weights by default
    assert cfg.model.mode == mode
    assert_bitwise_equal(model.state_dict(), weights(full, "ema.safetensors"))


def test_autoencoder_stage_with_discriminator_resumes_bit_exactly(tmp_path):
    extra = {"autoencoder.base_channels": 8, "autoencoder.groups": 8, "ae_loss.disc_weight": 0.1,
             "ae_loss.disc_start": 1, "ae_loss.disc_channels": 8}
    full = run("autoencoder", tiny_sets(tmp_path / "full", steps=4, **extra))
    part = tiny_sets(tmp_path / "part", steps=4, **extra)
    run("autoencoder", part, stop_after=2)
    run("autoencoder", part, resume=True)
    wa, wb = weights(full), weights(tmp_path / "part")
    assert_bitwise_equal(wa, wb)
    assert wa["latent_std"].min() > 0 and not torch.equal(wa["latent_std"], torch.ones(2, 8))  # stats were computed
    last = json.loads(open(tmp_path / "full" / "metrics.jsonl").readlines()[-1])
    assert {"recon", "kl", "gen", "disc"} <= last.keys()
    vae = runs.load_autoencoder(full)  # loads back as the diffusion stage will
    assert torch.equal(vae.latent_mean, wa["latent_mean"])
    with pytest.raises(ValueError, match="expected a diffusion run"):
        runs.load_transformer(full)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, ae_run, monkeypatch):
    real = Diffusion.loss
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        loss = real(self, *a, **k)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(Diffusion, "loss", flaky)
    with pytest.raises(NonFiniteLoss, match=r"non-finite \(nan\) at step 4.*checkpoint.pt \(step 3\)"):
        run("diffusion", tiny_sets(tmp_path, ae_run))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_an_old_dir(tmp_path, ae_run):
    sets = tiny_sets(tmp_path, ae_run, steps=3)
    run("diffusion", sets, stop_after=1)
    with pytest.raises(ValueError, match=r"differs from the saved run in \['model.width'\]"):
        run("diffusion", sets + ["model.width=64"], resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        run("diffusion", sets)
    run("diffusion", sets + ["train.steps=4"], resume=True)  # a longer schedule is allowed
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


def test_step_batches_are_a_function_of_the_step():
    whole = StepBatches(10, 4, seed=1)
    it = iter(whole)
    batches = [next(it) for _ in range(5)]
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))  # an epoch is a permutation
    resumed = iter(StepBatches(10, 4, seed=1, start=3))
    assert next(resumed) == batches[3]
    halves = [next(iter(StepBatches(10, 4, seed=1, start=2, rank=r, world=2))) for r in (0, 1)]
    assert halves[0] + halves[1] == batches[2]
    assert StepBatches(10, 4, 1, rank=1, world=2).keys(2).tolist() == [10, 11]
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        StepBatches(10, 4, 1, world=3)


def test_image_mode_samples_frames_independently():
    frames = FrameDataset(MovingShapes(3, 5, 16), 5)
    assert len(frames) == 15
    assert torch.equal(frames[7]["video"][0], MovingShapes(3, 5, 16)[1]["video"][2])


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = resolve("XL", sets=["model.mode=image", "train.betas=[0.9,0.95]", "data.kwargs={max_shapes: 2}"])
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    from walt.config import from_yaml_file

    assert from_yaml_file(tmp_path / "c.yaml") == cfg


def test_config_layers_yaml_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: S\ntrain:\n  lr: 3e-4\n  steps: 7\nmodel:\n  mode: image\n")
    cfg = resolve(yaml_files=[f], sets=["train.steps=9", "model.spatial_window=[1,4,4]"])
    assert cfg.preset == "S" and cfg.model.width == 384 and cfg.data.size == 128
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 9 and cfg.model.mode == "image"
    assert cfg.model.spatial_window == (1, 4, 4)
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'"):
        resolve(sets=["train.stpes=3"])
    with pytest.raises(ConfigError, match="expects a int"):
        resolve(sets=["train.steps=many"])
    with pytest.raises(ConfigError, match="unknown preset 'M'"):
        resolve("M")


@pytest.mark.parametrize("preset,lo,hi", [("L", 290, 330), ("XL", 440, 480), ("G", 1800, 2000)])
def test_cli_dry_run_reports_parameters(preset, lo, hi):
    res = CliRunner().invoke(cli, ["--preset", preset, "--dry-run"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    millions = float(re.search(r"WALT \(video\) [\d,]+ parameters \(([\d.]+)M\)", last).group(1))
    assert lo < millions < hi
    body = yaml.safe_load(res.output)
    assert body["preset"] == preset and body["model"]["depth"] == TRANSFORMER_PRESETS[preset]["depth"]


def test_cli_errors_are_one_sentence(tmp_path):
    res = CliRunner().invoke(cli, ["diffusion", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "needs autoencoder_run" in res.output
    res = CliRunner().invoke(cli, ["--set", "train.nope=1", "--dry-run"])
    assert res.exit_code == 2 and "unknown config key 'train.nope'" in res.output
    res = CliRunner().invoke(cli, ["diffusion", "--autoencoder", str(tmp_path), "--out", str(tmp_path / "y")])
    assert res.exit_code == 1 and "not a walt run directory" in res.output


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs")) if p.endswith(".yaml")))
def test_shipped_configs_resolve(path):
    cfg = resolve(yaml_files=[os.path.join(os.path.dirname(__file__), "..", "configs", path)])
    assert cfg.train.steps > 0 and cfg.model.mode in ("video", "image")


def test_cli_runs_both_stages_end_to_end(tmp_path):
    def sets(name, **extra):
        args = []
        for s in tiny_sets(tmp_path / name, steps=2, **{"autoencoder.base_channels": 8, "autoencoder.groups": 8, **extra}):
            if not s.startswith("out_dir="):
                args += ["--set", s]
        return args + ["--out", str(tmp_path / name)]

    runner = CliRunner()
    res = runner.invoke(cli, ["autoencoder", *sets("ae")])
    assert res.exit_code == 0, res.output
    for mode in ("video", "image"):
        args = ["diffusion", "--mode", mode, "--autoencoder", str(tmp_path / "ae"), *sets(mode)]
        res = runner.invoke(cli, [*args, "--stop-after", "1"])
        assert res.exit_code == 0 and not (tmp_path / mode / "model.safetensors").exists(), res.output
        res = runner.invoke(cli, [*args, "--resume"])
        assert res.exit_code == 0, res.output
        assert (tmp_path / mode / "ema.safetensors").exists()
        assert yaml.safe_load((tmp_path / mode / "config.yaml").read_text())["model"]["mode"] == mode


def test_dataset_protocol_tensor_file_factory_and_tuples(tmp_path):
    from safetensors.torch import save_file

    from walt.config import DataConfig
    from walt.data.dataset import build_dataset, clip_of
    from walt.train.data import collate

    clips = torch.rand(3, 5, 3, 16, 16) * 2 - 1
    save_file({"video": clips}, str(tmp_path / "clips.safetensors"))
    ds = build_dataset(DataConfig(kind="tensor", path=str(tmp_path / "clips.safetensors")))
    assert len(ds) == 3 and torch.equal(ds[1]["video"], clips[1])
    ds = build_dataset(DataConfig(kind="factory", factory="walt.data.synthetic:MovingShapes", kwargs={"num_clips": 2, "frames": 5, "size": 16}))
    assert len(ds) == 2 and ds[0]["video"].shape == (5, 3, 16, 16)
    tuples = torch.utils.data.TensorDataset(clips)
    assert collate([tuples[0], tuples[2]]).shape == (2, 5, 3, 16, 16)
    with pytest.raises(ValueError, match=r"clip \(T, 3, H, W\).*got \(5, 16, 16, 3\)"):
        clip_of({"video": torch.zeros(5, 16, 16, 3)})
    with pytest.raises(ValueError, match="module:callable"):
        build_dataset(DataConfig(kind="factory", factory="nocolon"))
    save_file({"video": clips[0]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"must be \(N, T, 3, H, W\)"):
        build_dataset(DataConfig(kind="tensor", path=str(tmp_path / "bad.safetensors")))


def test_gradient_accumulation_matches_one_big_step(tmp_path, ae_run):
    one = run("diffusion", tiny_sets(tmp_path / "one", ae_run, steps=3))
    two = run("diffusion", tiny_sets(tmp_path / "two", ae_run, steps=3, **{"train.grad_accum": 2}))
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in open(tmp_path / "one" / "metrics.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)
    with pytest.raises(ValueError, match="divisible by processes x train.grad_accum"):
        run("diffusion", tiny_sets(tmp_path / "three", ae_run, steps=3, **{"train.grad_accum": 3}))


@pytest.mark.slow
def test_cpu_preset_demo_runs_all_stages(tmp_path):
    """The documented demo, as shipped: 40 steps of each stage on the cpu preset."""
    runner = CliRunner()
    res = runner.invoke(cli, ["autoencoder", "--out", str(tmp_path / "ae")])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in open(tmp_path / "ae" / "metrics.jsonl")]
    assert recs[-1]["step"] == 40 and recs[-1]["recon"] < recs[0]["recon"]
    for mode in ("video", "image"):
        res = runner.invoke(cli, ["diffusion", "--mode", mode, "--autoencoder", str(tmp_path / "ae"), "--out", str(tmp_path / mode)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / mode / "samples" / "step_000040.png").exists()
        assert (tmp_path / mode / "ema.safetensors").exists()


def test_diffusion_run_records_its_autoencoder_and_checks_the_latent_grid(tmp_path, ae_run):
    out = run("diffusion", tiny_sets(tmp_path / "a", ae_run, steps=1))
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["autoencoder"]["base_channels"] == TINY_AE["base_channels"]  # the run's, not the preset's 16
    with pytest.raises(ValueError, match=r"into 2x8x8 latents, larger than model.input_size 5x4x4"):
        run("diffusion", tiny_sets(tmp_path / "b", ae_run, steps=1, **{"data.size": 32, "model.input_size": [5, 4, 4]}))


def test_autoencoder_trains_on_a_procedural_world_store(tmp_path):
    data = pytest.importorskip("walt.data", reason="walt.data not available")
    data.generate(str(tmp_path / "world"), data.WorldConfig(frames=5, height=16, width=16, track_points=4, textures="procedural"),
                  {"train": 2}, shard_size=2, workers=1, progress=False)
    sets = tiny_sets(tmp_path / "ae", steps=2, **{"autoencoder.base_channels": 8, "autoencoder.groups": 8,
                                                   "data.kind": "world", "data.path": str(tmp_path / "world"),
                                                   "data.kwargs": {"split": "train"}})
    out = run("autoencoder", sets)
    assert weights(out)["latent_std"].min() > 0


def test_sigterm_checkpoints_and_stops_then_resume_is_bit_exact(tmp_path, ae_run, monkeypatch):
    import signal

    full = run("diffusion", tiny_sets(tmp_path / "full", ae_run))
    real, calls = Diffusion.loss, []

    def preempted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # during the 4th step (one loss call per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(Diffusion, "loss", preempted)
    part = tiny_sets(tmp_path / "part", ae_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match=r"interrupted by SIGTERM at step 4 of 6: .*checkpoint.pt is written; .*--resume"):
        run("diffusion", part)  # the step finishes, is checkpointed, and the run stops
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not os.path.exists(tmp_path / "part" / "model.safetensors")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    monkeypatch.setattr(Diffusion, "loss", real)
    run("diffusion", part, resume=True)
    assert_bitwise_equal(weights(full), weights(tmp_path / "part"))


def test_both_modes_see_the_same_latent_tokens_per_step(tmp_path, ae_run):
    per_step = {}
    for mode in ("video", "image"):
        out = run("diffusion", tiny_sets(tmp_path / mode, ae_run, steps=2, **{"model.mode": mode, "train.num_samples": 0}))
        recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        per_step[mode] = {r["tokens_per_step"] for r in recs}
    # 4 clips of 5 frames -> 4 x 2 latent frames of 4x4 tokens; I-WALT: 8 single frames of 4x4
    assert per_step["video"] == per_step["image"] == {4 * 2 * 16}
    off = run("diffusion", tiny_sets(tmp_path / "unmatched", ae_run, steps=1,
                                     **{"model.mode": "image", "train.match_tokens": False, "train.num_samples": 0}))
    assert json.loads(open(os.path.join(off, "metrics.jsonl")).readline())["tokens_per_step"] == 4 * 16


def test_each_mode_trains_on_its_own_latent_statistics(tmp_path, ae_run, monkeypatch):
    from walt.train import diffusion

    seen = []
    real = diffusion.latents_for
    monkeypatch.setattr(diffusion, "latents_for", lambda mode, vae, video: seen.append((mode, video.shape)) or real(mode, vae, video))
    for mode in ("video", "image"):
        run("diffusion", tiny_sets(tmp_path / mode, ae_run, steps=1, **{"model.mode": mode, "train.num_samples": 0,
                                                                         "train.cache_latents": False}))
    assert seen == [("video", (4, 5, 3, 16, 16)), ("image", (8, 1, 3, 16, 16))]


def test_video_mode_image_steps_take_single_frames(tmp_path, ae_run, monkeypatch):
    from walt.train import diffusion

    shapes = []
    real = diffusion.latents_for
    monkeypatch.setattr(diffusion, "latents_for", lambda mode, vae, video: shapes.append(tuple(video.shape)) or real(mode, vae, video))
    out = run("diffusion", tiny_sets(tmp_path, ae_run, steps=8, **{"train.image_fraction": 0.5, "train.num_samples": 0,
                                                                   "train.cache_latents": False}))
    assert set(shapes) == {(4, 5, 3, 16, 16), (8, 1, 3, 16, 16)}  # clip steps and image steps, same tokens
    assert {json.loads(x)["tokens_per_step"] for x in open(os.path.join(out, "metrics.jsonl"))} == {4 * 2 * 16}
    with pytest.raises(ValueError, match="image_fraction"):
        run("diffusion", tiny_sets(tmp_path / "img", ae_run, **{"model.mode": "image", "train.image_fraction": 0.5}))


def test_snapshots_are_kept_survive_a_kill_and_load_by_step(tmp_path, ae_run):
    keep = {"train.keep_every": [0.5, 1.0], "train.num_samples": 0}
    full = run("diffusion", tiny_sets(tmp_path / "full", ae_run, **keep))
    assert runs.snapshot_steps(full) == [3, 6]
    part = tiny_sets(tmp_path / "part", ae_run, **keep)
    run("diffusion", part, stop_after=2)
    run("diffusion", part, resume=True, stop_after=2)  # killed after the step-3 snapshot ...
    run("diffusion", part, resume=True)  # ... and finished
    for step in (3, 6):
        a = load_file(runs.snapshot_path(full, step))
        assert_bitwise_equal(a, load_file(runs.snapshot_path(str(tmp_path / "part"), step)))
        model, _ = runs.load_transformer(full, step=step)
        assert_bitwise_equal(model.state_dict(), a)
    assert_bitwise_equal(load_file(runs.snapshot_path(full, 6)), weights(full, "ema.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no snapshot at step 4; it has \[3, 6\]"):
        runs.load_transformer(full, step=4)

    # The untrained control is the run's own initial weights: a run whose optimizer never steps keeps them.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
        frozen = run("diffusion", tiny_sets(tmp_path / "frozen", ae_run, steps=1, **{"train.num_samples": 0}))
    untrained, _ = runs.load_transformer(frozen, weights=False)
    assert_bitwise_equal(untrained.state_dict(), weights(frozen))
    assert not torch.equal(untrained.state_dict()["blocks.0.attn.qkv.weight"], weights(full)["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_shipped_configs_train_on_the_world_on_fused_kernels(name):
    cfg = resolve(yaml_files=[os.path.join(os.path.dirname(__file__), "..", "configs", name)])
    assert cfg.data.kind == "world" and cfg.data.path
    assert cfg.model.attention_backend == "fused" and cfg.diffusion.noise_backend == "fused"
    assert cfg.train.match_tokens


def test_sigterm_exits_with_status_3_and_says_how_to_resume(tmp_path, ae_run, monkeypatch):
    import signal

    real, calls = Diffusion.loss, []

    def preempted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(Diffusion, "loss", preempted)
    args = [a for s in tiny_sets(tmp_path / "r", ae_run) if not s.startswith("out_dir=") for a in ("--set", s)]
    res = CliRunner().invoke(cli, ["diffusion", *args, "--out", str(tmp_path / "r")])
    assert EXIT_INTERRUPTED == 3 and res.exit_code == 3, res.output
    assert "done:" not in res.output and "interrupted by SIGTERM at step 2 of 6" in res.output and "--resume" in res.output


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, ae_run):
    image = tiny_sets(tmp_path / "iwalt", ae_run, steps=3, **{"model.mode": "image"})
    video = tiny_sets(tmp_path / "vwalt", ae_run, steps=3)
    run("diffusion", image, stop_after=1)
    run("diffusion", video, stop_after=1)
    os.replace(tmp_path / "iwalt" / "checkpoint.pt", tmp_path / "vwalt" / "checkpoint.pt")  # copied into the V-WALT run
    with pytest.raises(ValueError, match=r"checkpoint.pt was written by a different run, whose config differs in "
                                         r"\['model.mode'\] \(model.mode: 'image' there, 'video' here\)"):
        run("diffusion", video, resume=True)
    assert not (tmp_path / "vwalt" / "model.safetensors").exists()


def test_resume_accepts_the_same_run_named_another_way_or_moved(tmp_path, ae_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = lambda out: tiny_sets(out, ae_run, steps=4)  # noqa: E731
    run("diffusion", sets("runs/x"), stop_after=1)
    run("diffusion", sets("./runs/x"), resume=True, stop_after=1)
    run("diffusion", sets(str(tmp_path / "runs" / "x")), resume=True, stop_after=1)
    os.replace(tmp_path / "runs" / "x", tmp_path / "moved")
    run("diffusion", sets("moved"), resume=True)
    assert torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match=r"differs from the saved run in \['model.width'\] \(model.width: 32 there, 64 here\)"):
        run("diffusion", sets("moved") + ["model.width=64"], resume=True)


def test_a_second_writer_of_a_run_directory_is_refused_with_the_holders_pid(tmp_path, ae_run):
    out = tmp_path / "run"
    os.makedirs(out)
    held = lock_run_dir(str(out))  # another walt-train writing here (flock: refused even within one process)
    try:
        with pytest.raises(RunInUse, match=rf"{out} is in use by another walt-train process \(pid {os.getpid()}\)"):
            run("diffusion", tiny_sets(out, ae_run, steps=2))
        args = [a for s in tiny_sets(out, ae_run, steps=2) if not s.startswith("out_dir=") for a in ("--set", s)]
        res = CliRunner().invoke(cli, ["diffusion", *args, "--out", str(tmp_path / "." / "run")])  # named another way
        assert res.exit_code == 1 and "is in use by another walt-train process" in res.output and "done" not in res.output
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        os.close(held)
    run("diffusion", tiny_sets(out, ae_run, steps=2))  # released: the run proceeds
    assert (out / "model.safetensors").exists()


def test_resume_needs_the_same_thread_count(tmp_path, ae_run):
    """Bit-exact resume means the same number of CPU threads: CPU kernels round differently at
    another thread count, so train.threads is not a resumable change."""
    sets = tiny_sets(tmp_path, ae_run, steps=3, **{"train.threads": 1})
    run("diffusion", sets, stop_after=1)
    with pytest.raises(ValueError, match=r"differs from the saved run in \['train.threads'\]"):
        run("diffusion", sets + ["train.threads=2"], resume=True)
    from walt.config import RESUMABLE_CHANGES

    assert "train.threads" not in RESUMABLE_CHANGES


def test_unreadable_checkpoints_are_one_clear_sentence(tmp_path, ae_run):
    sets = tiny_sets(tmp_path, ae_run, steps=3)
    run("diffusion", sets, stop_after=1)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    cases = [(b"", "the file is empty"),
             (good[: len(good) // 2], "it is not a complete torch.save archive"),
             (os.urandom(4096), "it is not a complete torch.save archive")]
    for content, reason in cases:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"^checkpoint .*checkpoint.pt could not be read as a walt training checkpoint: "
                                             + re.escape(reason)):
            run("diffusion", sets, resume=True)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"it lacks \['step', 'model', 'ema', 'optimizer', 'scheduler', 'extra', 'rng'\]"):
        run("diffusion", sets, resume=True)
    # another architecture, from a checkpoint that carries no config (older ones): one sentence, not a traceback
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    del state["config"]
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("blocks.1.")}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt does not fit the configured diffusion model \(Missing key\(s\)"):
        run("diffusion", sets, resume=True)


@pytest.mark.parametrize("setting, message", [
    ("train.steps=-1", r"config key 'train.steps' must be an integer >= 1, got -1"),
    ("train.batch_size=0", r"'train.batch_size' must be an integer >= 1, got 0"),
    ("train.betas=0.9", r"'train.betas' must be a pair \[beta1, beta2\] of numbers in \[0, 1\), got 0.9"),
    ("train.precision=fp8", r"'train.precision' must be one of 'bf16', 'fp32', got 'fp8'"),
    ("train.threads=-3", r"'train.threads' must be an integer >= 0, got -3"),
    ("train.lr=-1e-3", r"'train.lr' must be a number in \(0, inf\)"),
    ("train.ema_decay=1.5", r"'train.ema_decay' must be a number in \[0, 1\)"),
    ("data.kind=world", r"data.kind 'world' needs data.path: a `walt-data generate` directory"),
    ("data.kind=videos", r"'data.kind' must be one of"),
    ("model.mode=movie", r"'model.mode' must be one of 'video', 'image'"),
    ("model.heads=3", r"'model.width' must be divisible by model.heads \(3\)"),
    ("diffusion.sample_steps=0", r"'diffusion.sample_steps' must be an integer in \[1, 1000\]"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, setting, message):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["autoencoder", "--out", str(out), "--set", setting])
    assert res.exit_code == 2 and re.search(message, res.output), res.output
    assert "Traceback" not in res.output and not out.exists()


def test_bad_options_and_data_paths_leave_the_output_directory_untouched(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["autoencoder", "--out", str(out), "--stop-after", "0"])
    assert res.exit_code == 2 and "Invalid value for '--stop-after'" in res.output and not out.exists()
    res = CliRunner().invoke(cli, ["autoencoder", "--out", str(out), "--set", "data.kind=world",
                                   "--set", f"data.path={tmp_path / 'nothing'}"])
    assert res.exit_code == 1 and "manifest.json not found" in res.output and not out.exists()
    res = CliRunner().invoke(cli, ["autoencoder", "--out", str(out), "--resume"])
    assert res.exit_code == 1 and "holds no checkpoint.pt; run without --resume" in res.output and not out.exists()


def test_exported_weights_have_the_mode_of_every_other_output(tmp_path, ae_run):
    out = run("diffusion", tiny_sets(tmp_path, ae_run, steps=1))
    mode = lambda name: os.stat(os.path.join(out, name)).st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("ema.safetensors") == mode("config.yaml") == mode("checkpoint.pt")


def test_a_write_error_ends_in_one_sentence_and_keeps_what_was_written(tmp_path):
    """A full disk, simulated with a file-size limit the checkpoint exceeds."""
    out = tmp_path / "ae"
    args = ["autoencoder", "--out", str(out)]
    for s in tiny_sets(out, steps=2, **{"autoencoder.base_channels": 8, "autoencoder.groups": 8, "train.ckpt_every": 1}):
        if not s.startswith("out_dir="):
            args += ["--set", s]
    res = run_with_file_size_limit(tmp_path, 20000, "train", args)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write {out / 'checkpoint.pt'}: File too large; files written before are kept: free space "
        "(or fix the file system) and rerun without --resume")
    assert not [n for n in os.listdir(out) if ".tmp" in n] and (out / "config.yaml").exists()
    res = run_python("-m", "walt.cli.train", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["video", "image"])
def test_cached_latents_are_what_latents_for_gives_in_the_dataset_order(tmp_path, ae_run, mode):
    from walt.data.modes import latents_for
    from walt.train.diffusion import DiffusionTask
    from walt.train.distributed import setup

    cfg = resolve("cpu", sets=tiny_sets(tmp_path, ae_run, **{"model.mode": mode}), extra={"stage": "diffusion"})
    assert cfg.train.cache_latents  # the CPU preset caches
    task = DiffusionTask(cfg, setup("cpu"))
    clips = MovingShapes(8, 5, 16)
    n = 8 * 5 if mode == "image" else 8
    assert len(task.dataset) == n and task.dataset.shape[1:] == ((1,) if mode == "image" else (2,)) + (4, 4, 8)
    with torch.no_grad():
        for j in (0, 3, n - 1):
            if mode == "image":
                want = latents_for("image", task.vae, clips[j // 5]["video"][None, j % 5 : j % 5 + 1])[0]
            else:
                want = latents_for("video", task.vae, clips[j]["video"][None])[0]
            torch.testing.assert_close(task.dataset[j], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache_latents"):
        DiffusionTask(resolve("cpu", sets=tiny_sets(tmp_path, ae_run, **{"train.image_fraction": 0.5}),
                              extra={"stage": "diffusion"}), setup("cpu"))
