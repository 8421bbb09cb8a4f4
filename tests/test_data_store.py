"""Generated datasets on disk, the dataset protocol, transforms and the walt-data CLI."""
import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import WALT_ROOT, child_env, run_python, run_with_file_size_limit
from walt.cli.data import main as cli
from walt.data.dataset import ClipDataset, FrameDataset
from walt.data.store import FORMAT, WorldStore, generate, read_manifest
from walt.data.transforms import CenterCrop, Compose, RandomCrop, Resize, crop, denormalize
from walt.data.world import LABEL_NAMES, WorldConfig, project, render_clip, unproject

SMALL = WorldConfig(seed=1, frames=5, height=24, width=24, track_points=16, textures="procedural")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate(out, SMALL, {"train": 5, "val": 3}, shard_size=2, workers=1, progress=False)
    return out


def test_store_returns_exactly_what_was_rendered(store_dir):
    store = WorldStore(store_dir, "train")
    assert len(store) == 5
    for i in (0, 3, 4):
        clip, ref = store.load(i), render_clip(SMALL, "train", i)
        assert set(clip) == set(ref)
        for key in ref:
            np.testing.assert_array_equal(clip[key], ref[key], err_msg=key)
    manifest = read_manifest(store_dir)
    assert manifest["splits"]["train"]["shards"] == {"train-00000.h5": [0, 2], "train-00001.h5": [2, 2], "train-00002.h5": [4, 1]}
    with pytest.raises(IndexError):
        store.load(5)


def test_generation_resumes_and_renders_only_missing_shards(tmp_path, store_dir):
    out = str(tmp_path)
    generate(out, SMALL, {"train": 5}, shard_size=2, workers=1, progress=False)
    # simulate a run killed while writing shard 1: its temp file exists, the manifest lacks it
    m = read_manifest(out)
    del m["splits"]["train"]["shards"]["train-00001.h5"]
    json.dump(m, open(os.path.join(out, "manifest.json"), "w"))
    os.replace(os.path.join(out, "train-00001.h5"), os.path.join(out, "train-00001.h5.tmp"))
    with pytest.raises(ValueError, match="3 of 5 clips finished"):
        WorldStore(out, "train")
    before = os.stat(os.path.join(out, "train-00000.h5")).st_mtime_ns
    generate(out, SMALL, {"train": 5}, shard_size=2, workers=1, progress=False)
    assert os.stat(os.path.join(out, "train-00000.h5")).st_mtime_ns == before  # not rewritten
    np.testing.assert_array_equal(WorldStore(out, "train").load(2)["video"], WorldStore(store_dir, "train").load(2)["video"])
    with pytest.raises(ValueError, match="different config"):
        generate(out, WorldConfig(seed=2, frames=5, height=24, width=24, textures="procedural"), {"train": 5},
                 shard_size=2, workers=1, progress=False)


def test_parallel_generation_matches_serial(tmp_path, store_dir):
    out = str(tmp_path)
    generate(out, SMALL, {"val": 3}, shard_size=1, workers=2, progress=False)
    a, b = WorldStore(out, "val"), WorldStore(store_dir, "val")
    for i in range(3):
        for key, value in a.load(i).items():
            np.testing.assert_array_equal(value, b.load(i)[key], err_msg=key)


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*walt-data generate"):
        WorldStore(str(tmp_path))


def test_clip_dataset_protocol_and_loader(store_dir):
    ds = ClipDataset(WorldStore(store_dir, "train"))
    item = ds[1]
    T, H, W = SMALL.frames, SMALL.height, SMALL.width
    assert item["video"].shape == (T, 3, H, W) and item["video"].dtype == torch.float32
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    np.testing.assert_array_equal(denormalize(item["video"]).numpy(), render_clip(SMALL, "train", 1)["video"])
    assert set(item["labels"]) == set(LABEL_NAMES)
    assert item["tracks"].shape == (SMALL.track_points, T, 2) and item["visible"].dtype == torch.bool
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["video"].shape == (2, T, 3, H, W) and batch["labels"]["motion"].shape == (2,)
    # worker processes open their own HDF5 handles and see the same data
    again = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)))
    torch.testing.assert_close(again["depth"], batch["depth"])

    frames = FrameDataset(ds)
    assert len(frames) == len(ds) * T
    f = frames[T + 3]  # clip 1, frame 3
    torch.testing.assert_close(f["video"], item["video"][3:4])  # a 1-frame clip
    torch.testing.assert_close(f["depth"], item["depth"][3])
    assert int(f["clip"]) == 1 and int(f["frame"]) == 3


def _world_points(s):
    """World positions of each track's point at every frame, from the (untransformed) world clip."""
    pts = []
    K, c2w, o2w = (s[k].double().numpy() for k in ("intrinsics", "cam_to_world", "object_to_world"))
    for n, (tq, y, x) in enumerate(s["query"].numpy()):
        tq, i, j = int(tq), int(y), int(x)
        p = unproject(np.array([x, y]), s["depth"][tq, i, j].item(), c2w[tq], K[tq])
        owner = int(s["mask"][tq, i, j])
        if owner:
            local = np.linalg.inv(o2w[tq, owner - 1]) @ np.append(p, 1.0)
            pts.append((o2w[:, owner - 1] @ local)[:, :3])
        else:
            pts.append(np.broadcast_to(p, (len(K), 3)))
    return np.stack(pts)


@pytest.mark.parametrize("transform", [Resize(12), Resize((36, 48)), CenterCrop(16),
                                       Compose(Resize(48), RandomCrop(32, torch.Generator().manual_seed(0)))])
def test_transforms_keep_tracks_intrinsics_and_boxes_consistent(store_dir, transform):
    ds = ClipDataset(WorldStore(store_dir, "train"))
    s = ds[0]
    t = transform(s)
    h, w = t["video"].shape[-2:]
    assert t["depth"].shape[-2:] == (h, w) and t["mask"].shape[-2:] == (h, w)
    # projecting the same 3D points with the new intrinsics lands on the new tracks
    world = _world_points(s)
    K, c2w = t["intrinsics"].double().numpy(), t["cam_to_world"].double().numpy()
    uv, _ = project(world, c2w[None], K[None])
    np.testing.assert_allclose(uv, t["tracks"].numpy(), atol=1e-3)
    # inside the new frame, judged on the stored (float32) tracks as the transform judges them: a
    # point exactly on the crop edge is a rounding away from either side in float64
    tr = t["tracks"].numpy()
    inside = (tr[..., 0] >= 0) & (tr[..., 0] < w) & (tr[..., 1] >= 0) & (tr[..., 1] < h)
    assert not (t["visible"].numpy() & ~inside).any()
    np.testing.assert_array_equal(t["visible"].numpy(), s["visible"].numpy() & inside)
    b = t["boxes"]
    assert (b[..., 0] >= 0).all() and (b[..., 2] <= w).all() and (b[..., 1] >= 0).all() and (b[..., 3] <= h).all()
    assert (b[..., 2] > b[..., 0])[t["box_valid"]].all()


def test_resize_uses_nearest_depth_and_crop_validates():
    s = ClipDataset(_Fake())[0]
    r = Resize(8)(s)  # 16 -> 8: output pixel centre j + 0.5 samples input 2j + 1
    torch.testing.assert_close(r["depth"], s["depth"][:, 1::2, 1::2])
    with pytest.raises(ValueError, match="does not fit"):
        crop(s, 10, 0, 8, 8)


class _Fake:
    label_names = {}

    def __len__(self):
        return 1

    def load(self, i):
        rng = np.random.default_rng(0)
        return {"video": rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
                "depth": rng.uniform(1, 2, (2, 16, 16)).astype(np.float32)}


def test_cli_generate_info_and_sheet(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "ds")
    args = ["--train", "2", "--val", "1", "--test", "1", "--size", "16", "--frames", "5", "--track-points", "8",
            "--textures", "procedural", "--workers", "1"]
    r = runner.invoke(cli, ["generate", "--out", out, "--dry-run", *args])
    assert r.exit_code == 0 and json.loads(r.output)["sizes"] == {"train": 2, "val": 1, "test": 1}
    assert not os.path.exists(out)
    r = runner.invoke(cli, ["generate", "--out", out, *args])
    assert r.exit_code == 0, r.output
    assert "4 clips ready" in r.output
    r = runner.invoke(cli, ["info", out])
    assert r.exit_code == 0 and "train: 2 clips" in r.output
    png = str(tmp_path / "sheet.png")
    r = runner.invoke(cli, ["sheet", "--root", out, "--split", "train", "--clips", "2", "--out", png])
    assert r.exit_code == 0, r.output
    from PIL import Image

    im = Image.open(png)
    assert im.width == 5 * 16 * 3 and im.height > 2 * 2 * 16 * 3
    r = runner.invoke(cli, ["generate", "--out", out, *args[:-2], "--seed", "9"])
    assert r.exit_code != 0 and "different config" in r.output


# --- bad arguments, write errors, damaged shards, killed runs ---------------------------------------

GOOD = ["--train", "2", "--val", "1", "--test", "0", "--size", "16", "--frames", "5", "--track-points", "4",
        "--textures", "procedural", "--workers", "1", "--shard-size", "2"]


def _with(args, option, value):
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


@pytest.mark.parametrize("option, value, message", [
    ("--train", "-5", r"Invalid value for '--train': -5 is not in the range x>=0"),
    ("--size", "0", r"Invalid value for '--size': 0 is not in the range x>=8"),
    ("--size", "-32", r"Invalid value for '--size'"),
    ("--size", "30", r"frame size must be a multiple of 8 pixels .* got 30x30"),
    ("--frames", "0", r"Invalid value for '--frames'"),
    ("--frames", "6", r"frames must be 1 \+ a multiple of 4 .* got 6"),
    ("--track-points", "-4", r"Invalid value for '--track-points'"),
    ("--shard-size", "0", r"Invalid value for '--shard-size'"),
    ("--shard-size", "-3", r"Invalid value for '--shard-size'"),
    ("--workers", "-1", r"Invalid value for '--workers'"),
    ("--seed", "-1", r"Invalid value for '--seed'"),
    ("--train", "2.5", r"Invalid value for '--train'"),
])
def test_bad_generate_arguments_are_refused_before_anything_is_written(tmp_path, option, value, message):
    out = str(tmp_path / "ds")
    for dry in ([], ["--dry-run"]):
        r = CliRunner().invoke(cli, ["generate", "--out", out, *_with(GOOD, option, value), *dry])
        assert r.exit_code == 2 and re.search(message, r.output), r.output
        assert "Traceback" not in r.output and not os.path.exists(out)
    r = CliRunner().invoke(cli, ["generate", "--out", out, *GOOD])  # the corrected command is not refused
    assert r.exit_code == 0, r.output


def test_library_generate_validates_before_writing(tmp_path):
    out = str(tmp_path / "ds")
    bad = [(SMALL, {"train": -5}, 2, r"the size of split 'train' must be an integer >= 0, got -5"),
           (SMALL, {"train": 2}, 0, r"shard_size \(clips per shard\) must be an integer >= 1, got 0"),
           (WorldConfig(frames=5, height=30, width=32, textures="procedural"), {"train": 2}, 2, "multiple of 8"),
           (WorldConfig(frames=5, height=16, width=16, track_points=-4, textures="procedural"), {"train": 2}, 2,
            "track_points must be an integer >= 1, got -4")]
    for cfg, sizes, shard_size, message in bad:
        with pytest.raises(ValueError, match=message):
            generate(out, cfg, sizes, shard_size=shard_size, workers=1, progress=False)
        assert not os.path.exists(out)


@pytest.mark.parametrize("workers", ["0", "1", "2"])
def test_a_write_error_ends_in_one_sentence_and_a_rerun_continues(tmp_path, workers):
    """A full disk, simulated with a file-size limit: shards over the limit cannot be written. Before,
    HDF5 crashed the process (exit 139) with 0 or 1 workers."""
    out = str(tmp_path / "ds")
    args = ["generate", "--out", out, "--train", "6", "--val", "0", "--test", "0", "--size", "32", "--frames", "5",
            "--track-points", "4", "--textures", "procedural", "--shard-size", "1", "--workers", workers]
    one_clip = len(_shard(SMALL_32, 0))
    res = run_with_file_size_limit(tmp_path, int(one_clip * 0.8), "data", args)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(r"^Error: cannot write .*/ds/train-0000\d\.h5: File too large; .* rerun the same command", lines[0])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    read_manifest(out)  # still valid JSON with its format
    res = run_python("-m", "walt.cli.data", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(WorldStore(out, "train")) == 6


SMALL_32 = WorldConfig(seed=0, frames=5, height=32, width=32, track_points=4, textures="procedural")


def _shard(cfg, first):
    from dataclasses import asdict

    from walt.data.store import _shard_bytes

    return _shard_bytes(asdict(cfg), "train", first, 1)


def test_a_rerun_regenerates_damaged_shards(tmp_path):
    out = str(tmp_path)
    generate(out, SMALL, {"train": 5}, shard_size=2, workers=1, progress=False)
    sums = read_manifest(out)["splits"]["train"]["checksums"]
    assert sorted(sums) == ["train-00000.h5", "train-00001.h5", "train-00002.h5"]
    path0, path1 = os.path.join(out, "train-00000.h5"), os.path.join(out, "train-00001.h5")
    assert sums["train-00000.h5"]["bytes"] == os.path.getsize(path0)
    with open(path0, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(path0) // 2)
    data = bytearray(open(path1, "rb").read())  # same size, one byte flipped in the last chunk
    data[-100] ^= 0xFF
    open(path1, "wb").write(data)
    untouched = os.stat(os.path.join(out, "train-00002.h5")).st_mtime_ns
    generate(out, SMALL, {"train": 5}, shard_size=2, workers=1, progress=False)
    assert os.stat(os.path.join(out, "train-00002.h5")).st_mtime_ns == untouched
    store = WorldStore(out, "train")
    for i in range(4):
        np.testing.assert_array_equal(store.load(i)["video"], render_clip(SMALL, "train", i)["video"])


def test_a_manifest_without_checksums_still_finds_a_truncated_shard(tmp_path):
    out = str(tmp_path)
    generate(out, SMALL, {"train": 4}, shard_size=2, workers=1, progress=False)
    m = read_manifest(out)
    m["splits"]["train"].pop("checksums", None)  # as older versions wrote it
    json.dump(m, open(os.path.join(out, "manifest.json"), "w"))
    path = os.path.join(out, "train-00001.h5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2000)
    kept = os.stat(os.path.join(out, "train-00000.h5")).st_mtime_ns
    generate(out, SMALL, {"train": 4}, shard_size=2, workers=1, progress=False)
    assert os.stat(os.path.join(out, "train-00000.h5")).st_mtime_ns == kept
    np.testing.assert_array_equal(WorldStore(out, "train").load(3)["depth"], render_clip(SMALL, "train", 3)["depth"])


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_killing_generate_kills_its_workers(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = str(tmp_path / "ds")
    proc = subprocess.Popen([sys.executable, "-m", "walt.cli.data", "generate", "--out", out, "--train", "400", "--val", "0",
                             "--test", "0", "--size", "32", "--frames", "9", "--track-points", "4", "--shard-size", "2",
                             "--workers", "2", "--textures", "procedural"], cwd=WALT_ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if len(kids) >= 3 and os.path.exists(os.path.join(out, "train-00000.h5")):  # 2 workers + resource tracker
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(kids) >= 3, kids
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "workers outlived their killed parent"
    finally:
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_manifest_with_nothing_finished_gives_way_to_a_corrected_command(tmp_path):
    """Older versions wrote a bad command's config before failing; with no shard finished, the
    corrected command takes the directory over instead of being refused as a different config."""
    out = str(tmp_path)
    manifest = {"format": FORMAT, "config": {"seed": 0, "frames": 5, "height": 30, "width": 30},
                "shard_size": 0, "label_names": {}, "splits": {"train": {"size": -5, "shards": {}}}}
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    generate(out, SMALL, {"train": 2}, shard_size=2, workers=1, progress=False)
    assert read_manifest(out)["config"]["height"] == 24 and len(WorldStore(out, "train")) == 2
