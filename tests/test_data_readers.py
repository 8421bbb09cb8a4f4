"""Real-format readers: each round-trips a small file written in that exact format, and bad files
give an error that names them (or are skipped and counted when asked)."""
import csv
import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

from walt.data.dataset import ClipDataset
from walt.data.readers import (
    CASTLE_SIMU_DIR, FashionMNIST, ImageFolder, ReadError, RGBDSequence, TapVidPickle, UnlabelledVideos,
    VideoFolder, opencv_sample_videos, read_idx,
)
from walt.data.world import WorldConfig, render_clip

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _need(path, package):
    if not os.path.exists(path):
        pytest.skip(f"{package} not installed: apt-get install {package}")


# ----------------------------------------------------------------------------- idx
def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    _write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / name)), a)
    f = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    _write_idx(str(tmp_path / "f.idx"), f, code=0x0D)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "f.idx")), f)


def test_idx_bad_files_name_the_file(tmp_path):
    a = np.zeros((10, 4, 4), np.uint8)
    path = str(tmp_path / "cut-idx3-ubyte")
    _write_idx(path, a)
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ReadError, match="cut-idx3-ubyte: truncated"):
        read_idx(path)
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ReadError, match="junk: not an idx file"):
        read_idx(str(tmp_path / "junk"))
    with pytest.raises(ReadError, match="missing.*file not found"):
        read_idx(str(tmp_path / "missing"))


def test_fashion_mnist_package():
    _need(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"), "dataset-fashion-mnist")
    ds = FashionMNIST(split="test")
    assert len(ds) == 10000
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    item = ClipDataset(ds)[0]
    assert item["video"].shape == (1, 3, 28, 28) and int(item["labels"]["class"]) == int(ds.labels[0])


# ----------------------------------------------------------------------------- image folder
def test_image_folder_round_trip_and_corrupt_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("n01440764", "n01443537"):
        os.makedirs(tmp_path / cls)
        for k in range(2):
            a = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / cls / f"{cls}_{k}.png")
            imgs[(cls, k)] = a
    ds = ImageFolder(str(tmp_path))
    assert ds.label_names == {"class": ("n01440764", "n01443537")}
    assert len(ds) == 4
    item = ds.load(3)
    np.testing.assert_array_equal(item["video"][0], imgs[("n01443537", 1)])
    assert item["labels"] == {"class": 1}

    (tmp_path / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    ds = ImageFolder(str(tmp_path))
    bad = [i for i, (p, _) in enumerate(ds.items) if p.endswith("broken.jpg")][0]
    with pytest.raises(ReadError, match="broken.jpg: cannot decode image"):
        ds.load(bad)
    skipping = ImageFolder(str(tmp_path), on_error="skip")
    item = skipping.load(bad)
    assert skipping.skipped == 1 and item["video"].shape == (1, 12, 10, 3)


# ----------------------------------------------------------------------------- videos
def _write_video(path, frames, fps=10):
    import av

    with av.open(path, "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"qscale": "1"}
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


def _ramp_video(n, level0):
    """Flat frames whose grey level steps by 8 per frame, so decoded order and stride are checkable."""
    return np.stack([np.full((32, 48, 3), level0 + 8 * k, np.uint8) for k in range(n)])


def test_video_folder_kinetics_csv_round_trip(tmp_path):
    os.makedirs(tmp_path / "videos" / "juggling")
    _write_video(str(tmp_path / "videos" / "juggling" / "abc123_000010_000020.mp4"), _ramp_video(30, 10))
    _write_video(str(tmp_path / "videos" / "xyz789_000000_000010.mp4"), _ramp_video(12, 40))
    rows = [{"label": "juggling", "youtube_id": "abc123", "time_start": "10", "time_end": "20", "split": "val"},
            {"label": "archery", "youtube_id": "xyz789", "time_start": "0", "time_end": "10", "split": "val"}]
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = VideoFolder(str(tmp_path / "videos"), str(tmp_path / "val.csv"), num_frames=5, stride=2)
    assert ds.label_names == {"class": ("archery", "juggling")}
    item = ds.load(0)
    assert item["labels"] == {"class": 1} and item["video"].shape == (5, 32, 48, 3)
    levels = item["video"].reshape(5, -1).mean(1)
    # centred window of 9 frames in 30: frames 10, 12, ..., 18 -> levels 10 + 8 * k
    np.testing.assert_allclose(levels, 10 + 8 * np.arange(10, 19, 2), atol=4.0)  # lossy codec; steps are 16
    short = ds.load(1)["video"].reshape(5, -1).mean(1)  # 12 frames: window starts at 1
    np.testing.assert_allclose(short, 40 + 8 * np.arange(1, 10, 2), atol=4.0)


def test_video_folder_truncated_file_is_named_or_skipped(tmp_path):
    _write_video(str(tmp_path / "good.mp4"), _ramp_video(8, 0))
    data = open(tmp_path / "good.mp4", "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("path,label\ncut.mp4,a\ngood.mp4,b\n")
    ds = VideoFolder(str(tmp_path), str(tmp_path / "labels.csv"), num_frames=4)
    with pytest.raises(ReadError, match="cut.mp4"):
        ds.load(0)
    ds = VideoFolder(str(tmp_path), str(tmp_path / "labels.csv"), num_frames=4, on_error="skip")
    assert ds.load(0)["labels"] == {"class": 1} and ds.skipped == 1
    ds.load(0)
    assert ds.skipped == 1  # a bad file is counted once
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("path,category\ngood.mp4,b\n")
    with pytest.raises(ReadError, match="bad.csv: expected a header with a 'label' column"):
        VideoFolder(str(tmp_path), str(tmp_path / "bad.csv"))


def test_opencv_sample_videos_as_pretraining_clips():
    _need("/usr/share/doc/opencv-doc/examples/data/vtest.avi", "opencv-doc")
    ds = UnlabelledVideos(opencv_sample_videos(), num_frames=17, stride=2, size=(64, 64))
    assert len(ds) >= 20
    item = ClipDataset(ds)[len(ds) - 1]
    assert item["video"].shape == (17, 3, 64, 64)
    assert (item["video"][1:] - item["video"][:-1]).abs().mean() > 1e-3  # real motion, not a still


# ----------------------------------------------------------------------------- TAP-Vid
def _tapvid_entry(rng, T=6, H=20, W=30, N=5):
    video = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    points = rng.uniform(0, 1, (N, T, 2)).astype(np.float32)
    occluded = rng.uniform(size=(N, T)) < 0.3
    occluded[0] = True  # never visible: dropped, as TAP-Vid's evaluation does
    occluded[1, :2] = True  # first visible at frame 2
    occluded[1, 2] = False
    return {"video": video, "points": points, "occluded": occluded}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # 2 stores bytes via _codecs.encode
def test_tapvid_davis_pickle_round_trip(tmp_path, protocol):
    rng = np.random.default_rng(0)
    data = {"bear": _tapvid_entry(rng), "car-turn": _tapvid_entry(rng, T=4)}
    path = str(tmp_path / "tapvid_davis.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    ds = TapVidPickle(path)
    assert len(ds) == 2
    item = ds.load(0)
    e = data["bear"]
    np.testing.assert_array_equal(item["video"], e["video"])
    np.testing.assert_allclose(item["tracks"], e["points"][1:] * [30, 20], rtol=1e-6)
    np.testing.assert_array_equal(item["visible"], ~e["occluded"][1:])
    np.testing.assert_allclose(item["query"][0], [2, e["points"][1, 2, 1] * 20, e["points"][1, 2, 0] * 30], rtol=1e-6)


def test_tapvid_kinetics_pickle_with_jpeg_frames(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    e = _tapvid_entry(rng)
    yy, xx = np.mgrid[:20, :28]
    frames = np.stack([np.stack([xx * 9, yy * 12, np.full_like(xx, 30 * t)], -1) for t in range(6)]).astype(np.uint8)
    jpegs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    path = str(tmp_path / "tapvid_kinetics.pkl")
    with open(path, "wb") as f:
        pickle.dump([{"video": jpegs, "points": e["points"], "occluded": e["occluded"]}], f)
    item = TapVidPickle(path).load(0)
    assert item["video"].shape == frames.shape
    assert np.abs(item["video"].astype(int) - frames).mean() < 8
    np.testing.assert_allclose(item["tracks"], e["points"][1:] * [28, 20], rtol=1e-6)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/walt-pwned",))


def test_tapvid_unpickler_refuses_code_and_names_bad_files(tmp_path):
    path = str(tmp_path / "evil.pkl")
    with open(path, "wb") as f:
        pickle.dump({"v": {"video": _Evil(), "points": np.zeros(1), "occluded": np.zeros(1)}}, f)
    with pytest.raises(ReadError, match="evil.pkl: .*not allowed"):
        TapVidPickle(path)
    assert not os.path.exists("/tmp/walt-pwned")
    good = str(tmp_path / "good.pkl")
    with open(good, "wb") as f:
        pickle.dump({"bear": _tapvid_entry(np.random.default_rng(0))}, f)
    cut = str(tmp_path / "cut.pkl")
    open(cut, "wb").write(open(good, "rb").read()[:500])
    with pytest.raises(ReadError, match="cut.pkl: not a readable TAP-Vid pickle"):
        TapVidPickle(cut)


# ----------------------------------------------------------------------------- RGB-D with poses (ViSP layout)
def _write_visp(root, clip, depth_scale):
    from PIL import Image

    for d in ("Images", "Depth", "CameraPose", "Config"):
        os.makedirs(os.path.join(root, d))
    K = clip["intrinsics"][0]
    with open(os.path.join(root, "Config", "chateau_depth.xml"), "w") as f:
        f.write(f"<?xml version=\"1.0\"?>\n<conf>\n  <camera>\n    <px>{float(K[0, 0])!r}</px>\n    <py>{float(K[1, 1])!r}</py>\n"
                f"    <u0>{float(K[0, 2]) - 0.5!r}</u0>\n    <v0>{float(K[1, 2]) - 0.5!r}</v0>\n  </camera>\n</conf>\n")
    for k in range(len(clip["video"])):
        n = k + 1
        grey = clip["video"][k].mean(-1).round().astype(np.uint8)
        Image.fromarray(grey).save(os.path.join(root, "Images", f"Image_{n:04d}.pgm"))
        raw = np.round(clip["depth"][k] / depth_scale).astype("<u2")
        with open(os.path.join(root, "Depth", f"Depth_{n:04d}.bin"), "wb") as f:
            f.write(np.array(raw.shape, "<u4").tobytes() + raw.tobytes())
        cMo = np.linalg.inv(clip["cam_to_world"][k].astype(np.float64))
        np.savetxt(os.path.join(root, "CameraPose", f"Camera_{n:03d}.txt"), cMo, fmt="%.17g")


def test_rgbd_sequence_round_trip(tmp_path):
    clip = render_clip(WorldConfig(seed=4, frames=6, height=16, width=20, textures="procedural"), "train", 0)
    scale = 0.002  # the backdrop is up to ~50 m away: 2 mm units fit uint16 (Castle-simu uses 1/32768 m)
    root = str(tmp_path / "seq")
    _write_visp(root, clip, scale)
    ds = RGBDSequence(root, num_frames=3, depth_scale=scale, depth_from_color=None)
    assert len(ds) == 2
    item = ds.load(1)
    np.testing.assert_allclose(item["depth"], clip["depth"][3:6], atol=scale / 2 + 1e-6)
    np.testing.assert_allclose(item["cam_to_world"], clip["cam_to_world"][3:6], atol=1e-5)
    np.testing.assert_allclose(item["intrinsics"], clip["intrinsics"][3:6], rtol=1e-6)
    np.testing.assert_array_equal(item["video"][..., 0], clip["video"][3:6].mean(-1).round())

    with open(os.path.join(root, "Depth", "Depth_0005.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ReadError, match="Depth_0005.bin: truncated depth file"):
        ds.load(1)
    with open(os.path.join(root, "CameraPose", "Camera_002.txt"), "w") as f:
        f.write("1 0 0\n")
    with pytest.raises(ReadError, match="Camera_002.txt: expected 16 numbers"):
        ds.load(0)


def test_visp_castle_simu_package():
    _need(os.path.join(CASTLE_SIMU_DIR, "Depth", "Depth_0001.bin"), "visp-images-data")
    ds = RGBDSequence(num_frames=17, stride=2)
    item = ClipDataset(ds)[0]
    assert item["video"].shape == (17, 3, 480, 640) and item["depth"].shape == (17, 480, 640)
    d = item["depth"][item["depth"] > 0]
    assert 0.1 < d.min() and d.max() < 2.0  # the scene sits within ViSP's 2 m far clipping plane
    R = item["cam_to_world"][:, :3, :3].double()
    assert (R @ R.transpose(1, 2) - torch.eye(3, dtype=R.dtype)).abs().max() < 1e-5
    # the camera moves around the castle through the sequence
    assert (item["cam_to_world"][-1, :3, 3] - item["cam_to_world"][0, :3, 3]).norm() > 0.01
    # registered depth, intrinsics and poses agree: frame 0's surfaces reprojected into frame 16
    # land where frame 16's depth sees them (same surfaces, to a few millimetres)
    from walt.data.world import project, unproject

    K, c2w, D = item["intrinsics"][0].double().numpy(), item["cam_to_world"].double().numpy(), item["depth"].numpy()
    ii, jj = np.mgrid[0:480:4, 0:640:4]
    d = D[0, ii, jj]
    ok = d > 0
    p = unproject(np.stack([jj + 0.5, ii + 0.5], -1)[ok], d[ok], c2w[0], K)
    uv, z = project(p, c2w[16], K)
    inb = (uv[:, 0] >= 0) & (uv[:, 0] < 640) & (uv[:, 1] >= 0) & (uv[:, 1] < 480)
    dk = D[16, uv[inb, 1].astype(int), uv[inb, 0].astype(int)]
    err = np.abs(dk - z[inb])[dk > 0]
    assert len(err) > 1000 and np.median(err) < 0.002 and (err < 0.005).mean() > 0.8


def test_registering_depth_moves_it_into_the_colour_camera(tmp_path):
    """Depth written as seen by a camera 5 cm to the right comes back as the colour camera's depth."""
    from walt.data import world as W

    cfg = WorldConfig(seed=4, frames=3, height=48, width=64, textures="procedural")
    clip = render_clip(cfg, "train", 1)
    depth_from_color = np.array([[1, 0, 0, -0.05], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    depth_cam = clip["cam_to_world"].astype(np.float64) @ np.linalg.inv(depth_from_color)
    # ray cast the same scene from the depth camera
    objects = W._sample_scene(cfg, "train", 1)[5]
    K = clip["intrinsics"][0].astype(np.float64)
    jj, ii = np.meshgrid(np.arange(64) + 0.5, np.arange(48) + 0.5)
    d_cam = np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1).reshape(-1, 3)
    n = np.linalg.norm(d_cam, axis=-1)
    dirs = np.einsum("tij,pj->tpi", depth_cam[:, :3, :3], d_cam / n[:, None])
    eyes = np.broadcast_to(depth_cam[:, None, :3, 3], dirs.shape).copy()
    t, _ = W._scene_surfaces(objects, eyes, dirs)
    t = np.where(np.isfinite(t), t, W._backdrop_t(eyes, dirs))
    depth_clip = dict(clip, depth=(t / n).reshape(3, 48, 64).astype(np.float32))
    root = str(tmp_path / "seq")
    _write_visp(root, depth_clip, 0.002)
    item = RGBDSequence(root, num_frames=3, depth_scale=0.002).load(0)
    got, want = item["depth"], clip["depth"]
    hit = got > 0
    assert hit.mean() > 0.8  # splatting leaves a few holes (and the strip the depth camera cannot see)
    rel = np.abs(got[hit] - want[hit]) / want[hit]
    assert np.median(rel) < 0.002 and (rel < 0.02).mean() > 0.95
