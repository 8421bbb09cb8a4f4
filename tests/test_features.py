"""Feature extraction: taps equal a plain forward's block outputs, a clip's features do not depend on
its batch or the thread count, I-WALT never mixes frames, the controls, and walt-probe's CLI."""
import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from walt import runs
from walt.cli.probe import main as cli
from walt.data.modes import latents_for
from walt.data.store import WorldStore
from walt.features import FeatureFile, FeatureFileError, extract
from walt.features.dump import PreparedClips, load_backbone
from walt.models import WALT

pytestmark = pytest.mark.usefixtures("one_thread")


def world_clips(tiny, backbone_size):
    return PreparedClips(WorldStore(tiny["world"], "test"), backbone_size)


def features_of(backbone, clips, batch_size):
    ids = list(range(len(clips)))
    batches = ((torch.tensor(ids[k:k + batch_size]), torch.stack([clips[i]["video"] for i in ids[k:k + batch_size]]))
               for k in range(0, len(ids), batch_size))
    out = {}
    for idx, feats in extract(backbone, batches):
        for key, x in feats.items():
            out.setdefault(key, []).append(x)
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", ["video", "image"])
def test_taps_are_a_plain_forwards_block_outputs(tiny, mode):
    model, _ = runs.load_transformer(tiny[mode])
    x = torch.randn(2, 2 if mode == "video" else 5, 4, 4, 8)
    t = torch.tensor([0, 200])
    hooked = {}
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: hooked.__setitem__(i, o.clone()))
               for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x, t)
        taps = model.forward_features(x, t, [0, 1])
    for h in handles:
        h.remove()
    for b in (0, 1):
        assert torch.equal(taps[b], hooked[b]), b


@pytest.mark.parametrize("mode", ["video", "image"])
def test_a_clips_features_do_not_depend_on_batch_size_or_threads(tiny, mode):
    backbone, _, size = load_backbone(tiny[mode], [0, 1], [0, 200])
    clips = world_clips(tiny, size)
    one = features_of(backbone, clips, 1)
    three = features_of(backbone, clips, 3)
    assert one.keys() == three.keys() == {"t0000/b00", "t0000/b01", "t0200/b00", "t0200/b01"}
    for k in one:
        assert torch.equal(one[k], three[k]), k
    # threads: noise and transformer given the clip's latents (oneDNN's autoencoder convolutions
    # may round differently with another thread count; see walt.features.extract)
    z = backbone.latents(clips[1]["video"])
    torch.set_num_threads(2)
    two_threads = backbone.features_from_latents(z, 1)
    torch.set_num_threads(1)
    one_thread_ = backbone.features_from_latents(z, 1)
    for k in one:
        assert torch.equal(one_thread_[k], one[k][1]), k
        assert torch.equal(one_thread_[k], two_threads[k]), k
    assert not torch.equal(one["t0000/b01"], one["t0200/b01"])  # t changes the input
    # the noise is walt's fused op keyed by the clip id: the same clip under another id differs
    other = next(extract(backbone, [(torch.tensor([7]), clips[0]["video"][None])]))[1]
    assert not torch.equal(other["t0200/b00"][0], one["t0200/b00"][0])


def test_t0_is_the_schedules_first_index_practically_clean(tiny):
    backbone, _, _ = load_backbone(tiny["video"], [0], [0])
    assert backbone.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-12)


def test_iwalt_features_of_a_frame_ignore_the_other_frames(tiny):
    backbone, _, size = load_backbone(tiny["image"], [0, 1], [200])
    video = world_clips(tiny, size)[0]["video"]
    changed = video.clone()
    changed[3] = -changed[3]
    a = backbone.clip_features(video, 0)
    b = backbone.clip_features(changed, 0)
    for k in a:
        for j in range(video.shape[0]):
            assert torch.equal(a[k][j], b[k][j]) == (j != 3), (k, j)
    # V-WALT, by contrast, mixes frames: latent frame 0 (input frame 0 alone) sees frame 3 through attention
    vb, _, _ = load_backbone(tiny["video"], [1], [200])
    assert not torch.equal(vb.clip_features(video, 0)["t0200/b01"][0], vb.clip_features(changed, 0)["t0200/b01"][0])


def test_controls(tiny):
    trained, _, size = load_backbone(tiny["video"], [1], [200])
    random, attrs, _ = load_backbone("random:" + tiny["video"], [1], [200])
    assert attrs["kind"] == "random" and attrs["checkpoint"] == ""
    cfg = runs.run_config(tiny["video"])
    init = WALT.from_seed(cfg.model, cfg.train.seed)
    for k, v in init.state_dict().items():
        assert torch.equal(random.model.state_dict()[k], v), k
    video = world_clips(tiny, size)[0]["video"]
    assert not torch.equal(trained.clip_features(video, 0)["t0200/b01"], random.clip_features(video, 0)["t0200/b01"])
    latents, attrs, _ = load_backbone("latents:" + tiny["video"], [1], [200])
    assert latents.keys == ["latent"] and attrs["noise_backend"] == "none" and latents.model is None
    z = latents.clip_features(video, 0)["latent"]
    assert torch.equal(z, latents_for("video", latents.vae, video[None])[0])


def _one_sentence(result):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error:") and msg.rstrip().endswith((".", ")")), result.output
    return msg


def test_cli_refuses_bad_input_in_one_sentence_before_writing(tiny, tmp_path):
    out = tmp_path / "f.h5"
    base = ["dump", "--data", tiny["world"], "--out", str(out)]
    cases = [
        (["--run", tiny["ae"], "--blocks", "0", "--t", "0"], "expected a diffusion run"),
        (["--run", tiny["video"], "--blocks", "2", "--t", "0"], "block 2 is out of range"),
        (["--run", tiny["video"], "--blocks", "0", "--t", "1000"], "timestep 1000 is outside [0, 999]"),
        (["--run", tiny["video"], "--blocks", "x", "--t", "0"], "--blocks expects"),
        (["--run", tiny["video"], "--t", "0"], "--blocks and --t are required"),
        (["--run", str(tmp_path / "nope"), "--blocks", "0", "--t", "0"], "does not exist"),
        (["--run", tiny["video"], "--blocks", "0", "--t", "0", "--step", "5"], "no snapshot at step 5"),
        (["--run", tiny["video"], "--blocks", "0", "--t", "0", "--split", "val"], "no split 'val'"),
    ]
    runner = CliRunner()
    for args, expected in cases:
        msg = _one_sentence(runner.invoke(cli, base + args))
        assert expected in msg, (args, msg)
        assert not out.exists() and not (tmp_path / "f.h5.tmp").exists()
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    msg = _one_sentence(runner.invoke(cli, ["dump", "--run", tiny["video"], "--data", str(bad), "--blocks", "0",
                                            "--t", "0", "--out", str(out)]))
    assert "bad.pkl" in msg and not out.exists()


def test_cli_dump_and_pca(tiny, tmp_path):
    runner = CliRunner()
    for mode in ("video", "image"):
        res = runner.invoke(cli, ["dump", "--run", tiny[mode], "--data", tiny["world"], "--blocks", "0,1", "--t", "0,200",
                                  "--out", str(tmp_path / f"{mode}.h5"), "--limit", "3", "--batch-size", "2"])
        assert res.exit_code == 0, res.output
    v = FeatureFile(tmp_path / "video.h5", expect={"mode": "video", "kind": "walt", "blocks": [0, 1], "timesteps": [0, 200]})
    i = FeatureFile(tmp_path / "image.h5")
    assert len(v) == 3 and v.frame_index.tolist() == [0, 4] and i.frame_index.tolist() == [0, 1, 2, 3, 4]
    assert v.shape("t0200/b01") == (3, 2, 4, 4, 32) and i.shape("t0200/b01") == (3, 5, 4, 4, 32)
    with pytest.raises(FeatureFileError, match=r"has mode='image', expected 'video'"):
        i.check({"mode": "video"})
    res = runner.invoke(cli, ["pca", "--features", str(tmp_path / "video.h5"), "--features", str(tmp_path / "image.h5"),
                              "--key", "t0200/b01", "--clips", "0,2", "--out", str(tmp_path / "pca.png"),
                              "--gif", str(tmp_path / "pca.gif")])
    assert res.exit_code == 0, res.output
    from PIL import Image

    png, gif = Image.open(tmp_path / "pca.png"), Image.open(tmp_path / "pca.gif")
    assert png.height == 2 * 3 * 16 * 8  # 2 clips x (input + 2 runs) rows of 16-pixel frames zoomed 8x
    assert gif.n_frames == 5
    msg = _one_sentence(runner.invoke(cli, ["pca", "--features", str(tmp_path / "video.h5"), "--key", "t0300/b01",
                                            "--out", str(tmp_path / "x.png")]))
    assert "no features 't0300/b01'" in msg


def test_cli_latent_control_and_reader_alias(tiny, tmp_path):
    res = CliRunner().invoke(cli, ["dump", "--run", "latents:" + tiny["video"], "--data", tiny["world"], "--limit", "2",
                                   "--out", str(tmp_path / "z.h5"), "--no-video"])
    assert res.exit_code == 0, res.output
    ff = FeatureFile(tmp_path / "z.h5", expect={"kind": "latents"})
    assert ff.keys() == ["latent"] and ff.attrs["blocks"] == [] and ff.attrs["store_video"] is False
    assert np.array_equal(ff.features("t0200/latent"), ff.features("latent"))
    with pytest.raises(FeatureFileError, match="no input video"):
        ff.video([0])


def test_dump_reads_images_and_tapvid(tiny, tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "imgs" / c)
        for k in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * k + (c == "dog") * 100, np.uint8)).save(tmp_path / "imgs" / c / f"{k}.png")
    runner = CliRunner()
    res = runner.invoke(cli, ["dump", "--run", tiny["image"], "--data", str(tmp_path / "imgs"), "--blocks", "1",
                              "--t", "200", "--out", str(tmp_path / "img.h5")])
    assert res.exit_code == 0, res.output
    ff = FeatureFile(tmp_path / "img.h5", expect={"data_format": "images", "video_size": [1, 16, 16]})
    assert ff.shape("t0200/b01") == (4, 1, 4, 4, 32)
    assert ff.labels("class").tolist() == [0, 0, 1, 1] and ff.class_names("class") == ("cat", "dog")
    with pytest.raises(FeatureFileError, match="no 'depth' annotations"):
        ff.target("depth")

    rng = np.random.default_rng(0)
    points = rng.uniform(0.1, 0.9, (3, 8, 2)).astype(np.float32)
    occluded = np.zeros((3, 8), bool)
    occluded[1, :6] = True  # first visible at frame 6: past the run's 5 frames, dropped
    occluded[2, 0] = True   # first visible at frame 1
    entry = {"video": rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), "points": points, "occluded": occluded}
    with open(tmp_path / "davis.pkl", "wb") as f:
        pickle.dump({"a": entry, "b": {**entry, "points": points[:1], "occluded": occluded[:1]}}, f)
    res = runner.invoke(cli, ["dump", "--run", tiny["video"], "--data", str(tmp_path / "davis.pkl"), "--blocks", "1",
                              "--t", "0", "--out", str(tmp_path / "tap.h5")])
    assert res.exit_code == 0, res.output
    ff = FeatureFile(tmp_path / "tap.h5", expect={"data_format": "tapvid", "video_size": [5, 16, 16]})
    tracks, query = ff.target("tracks"), ff.target("query")
    assert tracks.shape == (2, 2, 5, 2)  # padded to the most tracks a clip has
    np.testing.assert_allclose(tracks[0, 0], points[0, :5] * 16, rtol=1e-6)  # 32 -> 16 pixels
    np.testing.assert_allclose(query[0], [[0, points[0, 0, 1] * 16, points[0, 0, 0] * 16],
                                          [1, points[2, 1, 1] * 16, points[2, 1, 0] * 16]], rtol=1e-6)
    assert np.isnan(tracks[1, 1]).all() and not ff.target("visible")[1, 1].any()  # padding
    with h5py.File(tmp_path / "tap.h5") as f:
        assert f["video"].shape == (2, 5, 16, 16, 3)


def test_dump_reads_labelled_videos_and_an_rgbd_sequence(tiny, tmp_path):
    from walt.data.readers import CASTLE_SIMU_DIR
    from walt.diffusion.media import write_mp4

    for name, level in (("a.mp4", -0.5), ("b.mp4", 0.5)):
        write_mp4(str(tmp_path / name), torch.full((1, 9, 3, 24, 40), level))  # 9 frames of 24 x 40
    (tmp_path / "labels.csv").write_text("path,label\na.mp4,dark\nb.mp4,bright\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["dump", "--run", tiny["video"], "--data", str(tmp_path / "labels.csv"), "--blocks", "1",
                              "--t", "0", "--out", str(tmp_path / "vid.h5")])
    assert res.exit_code == 0, res.output
    ff = FeatureFile(tmp_path / "vid.h5", expect={"data_format": "videos", "video_size": [5, 16, 16]})
    assert ff.labels("class").tolist() == [1, 0] and ff.class_names("class") == ("bright", "dark")
    assert ff.video().shape == (2, 5, 16, 16, 3) and ff.video()[0].mean() < ff.video()[1].mean()
    if not os.path.isdir(CASTLE_SIMU_DIR):
        pytest.skip(f"no RGB-D sequence at {CASTLE_SIMU_DIR} (Debian package visp-images-data)")
    res = runner.invoke(cli, ["dump", "--run", tiny["video"], "--data", CASTLE_SIMU_DIR, "--blocks", "1", "--t", "0",
                              "--limit", "1", "--out", str(tmp_path / "rgbd.h5")])
    assert res.exit_code == 0, res.output
    ff = FeatureFile(tmp_path / "rgbd.h5", expect={"data_format": "rgbd"})
    assert ff.target_names == ["cam_to_world", "depth", "intrinsics"]
    assert ff.target("depth").shape == (1, 5, 16, 16) and ff.target("cam_to_world").shape == (1, 5, 4, 4)
    K = ff.target("intrinsics")[0, 0]  # 640 x 480 scaled by 1/30 to 21.3 x 16, then the centre 16 x 16
    assert 0 < K[0, 2] < 16 and 0 < K[1, 2] < 16
