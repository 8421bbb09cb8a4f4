"""Readers for real datasets' on-disk formats, as sources of the dataset protocol (walt.data.dataset).

Each reader has `__len__`, `load(i) -> dict of numpy arrays` (video as uint8 (T, H, W, 3)) and
`label_names`. A file that cannot be read raises `ReadError` naming it; readers that take
`on_error="skip"` instead log the file, count it in `.skipped`, and move on.

- VideoFolder        videos + a CSV of labels (Kinetics / SSv2 style), decoded with PyAV
- UnlabelledVideos   fixed-length clips cut from any videos (e.g. opencv_sample_videos())
- ImageFolder        root/<class>/<image> (ImageNet / Places style), decoded with Pillow
- TapVidPickle       TAP-Vid DAVIS / Kinetics pickles, through a restricted unpickler
- RGBDSequence       ViSP's `Castle-simu` layout: pgm frames, uint16 depth .bin, 4x4 pose .txt
- FashionMNIST       idx files (`read_idx` reads any idx file)
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import pickle
import re
import xml.etree.ElementTree as ET

import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot")
OPENCV_SAMPLES_DIR = "/usr/share/doc/opencv-doc/examples/data"
CASTLE_SIMU_DIR = "/usr/share/visp-images-data/ViSP-images/mbt-depth/Castle-simu"
CASTLE_SIMU_DEPTH_FROM_COLOR = np.array([[1, 0, 0, -0.05], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


class ReadError(ValueError):
    """A file that is missing, corrupt, truncated or not in the expected format."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)


def _resize(frames: np.ndarray, size) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, h, w, 3) with Pillow's antialiased bilinear filter."""
    if size is None:
        return frames
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])


class _Skipping:
    """Shared on_error handling: raise, or log + count + try the next item."""

    on_error = "raise"
    skipped = 0

    def _check_on_error(self, on_error):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        self.on_error, self.skipped, self.bad_files = on_error, 0, set()

    def load(self, index: int) -> dict:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except ReadError as e:
                if self.on_error == "raise":
                    raise
                if e.path not in self.bad_files:
                    self.bad_files.add(e.path)
                    self.skipped += 1
                    log.warning("skipping unreadable file (%d so far): %s", self.skipped, e)
        raise ReadError(getattr(self, "root", "dataset"), "no readable item left after skipping bad files")


# ----------------------------------------------------------------------------- idx (MNIST family)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally gzipped), e.g. MNIST / Fashion-MNIST images or labels."""
    path = str(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ReadError(path, "file not found") from None
    except (OSError, EOFError) as e:
        raise ReadError(path, f"cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ReadError(path, "not an idx file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ReadError(path, "truncated idx header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ReadError(path, f"truncated or padded idx file: header {dims} needs {expected} bytes, found {len(data)}")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


class FashionMNIST:
    """Fashion-MNIST images as 1-frame clips (28 x 28, grey repeated to RGB), label 'class'."""

    label_names = {"class": FASHION_MNIST_CLASSES}

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist", split: str = "train"):
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
        def find(stem):  # gzipped as distributed, or unpacked
            plain = os.path.join(root, stem)
            return plain if os.path.exists(plain) and not os.path.exists(plain + ".gz") else plain + ".gz"

        self.images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
        self.labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if len(self.images) != len(self.labels):
            raise ReadError(root, f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.images)

    def load(self, i):
        img = np.repeat(self.images[i][None, :, :, None], 3, axis=-1)
        return {"video": img, "labels": {"class": int(self.labels[i])}}


# ----------------------------------------------------------------------------- images
class ImageFolder(_Skipping):
    """root/<class>/<image>; classes are the sorted folder names. Items are 1-frame clips."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")

    def __init__(self, root: str, size=None, on_error: str = "raise"):
        self._check_on_error(on_error)
        self.root, self.size = root, size
        if not os.path.isdir(root):
            raise ReadError(root, "not a directory")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.items = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(self.EXTENSIONS)]
        if not self.items:
            raise ReadError(root, "no images found in class subfolders (expected root/<class>/<image>)")
        self.label_names = {"class": tuple(classes)}

    def __len__(self):
        return len(self.items)

    def _load(self, i):
        from PIL import Image, UnidentifiedImageError

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ReadError(path, f"cannot decode image ({e})") from None
        return {"video": _resize(img[None], self.size), "labels": {"class": label}}


# ----------------------------------------------------------------------------- videos
def decode_video(path: str, num_frames: int | None = None, stride: int = 1, start: int | str = 0,
                 size=None) -> np.ndarray:
    """Decode frames start, start+stride, ... (num_frames of them; all when None) as uint8
    (T, H, W, 3). start="center" centres the window in time. Short videos repeat their last frame."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ReadError(path, "has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or 0
            if start == "center":
                span = (num_frames - 1) * stride + 1 if num_frames else total
                start = max(0, (total - span) // 2) if total else 0
            frames = []
            for k, frame in enumerate(container.decode(stream)):
                if k < start or (k - start) % stride:
                    continue
                frames.append(_resize(frame.to_ndarray(format="rgb24")[None], size)[0])
                if num_frames and len(frames) == num_frames:
                    break
    except ReadError:
        raise
    except FileNotFoundError:
        raise ReadError(path, "file not found") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ReadError(path, f"cannot decode video ({e})") from None
    if not frames:
        raise ReadError(path, "no decodable frames (empty or truncated video)")
    while num_frames and len(frames) < num_frames:
        frames.append(frames[-1])
    return np.stack(frames)


class VideoFolder(_Skipping):
    """Videos under `root` labelled by a CSV (Kinetics / SSv2 style).

    The CSV has a `label` column and names each video by one of: a `path` column (relative to
    root), Kinetics' `youtube_id`, `time_start`, `time_end` (file `<id>_<start:06d>_<end:06d>.mp4`,
    in root or root/<label>/), or SSv2's `id` (file `<id>.webm`). Classes are the sorted labels
    unless `classes` is given. Each item is `num_frames` frames, `stride` apart, centred in time.
    """

    def __init__(self, root: str, csv_path: str, num_frames: int = 17, stride: int = 1, size=None,
                 classes=None, on_error: str = "raise"):
        self._check_on_error(on_error)
        self.root, self.num_frames, self.stride, self.size = root, num_frames, stride, size
        try:
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise ReadError(csv_path, "file not found") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise ReadError(csv_path, f"not a readable CSV ({e})") from None
        if not rows or "label" not in rows[0]:
            raise ReadError(csv_path, "expected a header with a 'label' column and at least one row")
        names = tuple(classes) if classes else tuple(sorted({r["label"] for r in rows}))
        self.label_names = {"class": names}
        self.items = []
        for line, r in enumerate(rows, start=2):
            if r["label"] not in names:
                raise ReadError(csv_path, f"line {line}: label {r['label']!r} is not one of the classes")
            self.items.append((self._video_path(r, csv_path, line), names.index(r["label"])))

    def _video_path(self, r, csv_path, line):
        if r.get("path"):
            return os.path.join(self.root, r["path"])
        if r.get("youtube_id"):
            name = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
            nested = os.path.join(self.root, r["label"], name)
            return nested if os.path.exists(nested) else os.path.join(self.root, name)
        if r.get("id"):
            return os.path.join(self.root, f"{r['id']}.webm")
        raise ReadError(csv_path, f"line {line}: no 'path', 'youtube_id' or 'id' column to name the video")

    def __len__(self):
        return len(self.items)

    def _load(self, i):
        path, label = self.items[i]
        video = decode_video(path, self.num_frames, self.stride, start="center", size=self.size)
        return {"video": video, "labels": {"class": label}}


def opencv_sample_videos(root: str = OPENCV_SAMPLES_DIR) -> list[str]:
    """The real videos shipped by the Debian package opencv-doc (the glitched copy excluded)."""
    names = ("Megamind.avi", "tree.avi", "vtest.avi")
    paths = [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n))]
    if not paths:
        raise FileNotFoundError(f"no sample videos in {root}; install them with `apt-get install opencv-doc`.")
    return paths


class UnlabelledVideos(_Skipping):
    """Non-overlapping clips of `num_frames` frames (`stride` apart) cut from each video, for
    pre-training. Videos are decoded once at construction, at `size`."""

    label_names: dict = {}

    def __init__(self, paths, num_frames: int = 17, stride: int = 2, size=(64, 64), on_error: str = "raise"):
        self._check_on_error(on_error)
        self.num_frames = num_frames
        self.videos, self.index = [], []
        for path in paths:
            try:
                frames = decode_video(path, None, stride, size=size)
            except ReadError as e:
                if on_error == "raise":
                    raise
                self.skipped += 1
                log.warning("skipping unreadable video (%d so far): %s", self.skipped, e)
                continue
            v = len(self.videos)
            self.videos.append(frames)
            self.index += [(v, s) for s in range(0, len(frames) - num_frames + 1, num_frames)]
        if not self.index:
            raise ReadError(", ".join(map(str, paths)) or "(no paths)", f"no video has {num_frames} frames")

    def __len__(self):
        return len(self.index)

    def _load(self, i):
        v, s = self.index[i]
        return {"video": self.videos[v][s:s + self.num_frames]}


# ----------------------------------------------------------------------------- TAP-Vid
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, numpy scalars/dtypes and plain containers; refuses every other global,
    so a pickle cannot run code while being read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "bytearray"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only arrays and plain containers)")


def restricted_load(path: str):
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise ReadError(path, "file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            ModuleNotFoundError, MemoryError) as e:
        raise ReadError(path, f"not a readable TAP-Vid pickle ({type(e).__name__}: {e})") from None


class TapVidPickle:
    """TAP-Vid DAVIS (dict name -> entry) or Kinetics (list of entries) pickles. An entry holds
    'video' (T, H, W, 3) uint8 or a list of JPEG bytes, 'points' (N, T, 2) (x, y) normalized to
    [0, 1], and 'occluded' (N, T) bool. Items give tracks in pixels, visible = not occluded, and
    query points (t, y, x) at each track's first visible frame (TAP-Vid's query_mode 'first');
    tracks never visible are dropped, as in TAP-Vid's evaluation."""

    label_names: dict = {}

    def __init__(self, path: str, size=None):
        self.path, self.size = path, size
        data = restricted_load(path)
        if isinstance(data, dict):
            self.names, entries = list(data), list(data.values())
        elif isinstance(data, list):
            self.names, entries = [str(i) for i in range(len(data))], data
        else:
            raise ReadError(path, f"expected a dict or list of videos, found {type(data).__name__}")
        for name, e in zip(self.names, entries):
            if not isinstance(e, dict) or not {"video", "points", "occluded"} <= set(e):
                raise ReadError(path, f"entry {name!r} lacks 'video', 'points' or 'occluded'")
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def load(self, i):
        e, name = self.entries[i], self.names[i]
        video = e["video"]
        if len(video) and isinstance(video[0], (bytes, bytearray)):
            from PIL import Image

            try:
                video = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in video])
            except OSError as err:
                raise ReadError(self.path, f"entry {name!r}: cannot decode JPEG frame ({err})") from None
        video = np.asarray(video)
        points, occluded = np.asarray(e["points"], np.float32), np.asarray(e["occluded"], bool)
        T, H, W = video.shape[:3]
        if points.shape[:2] != occluded.shape or points.shape[1] != T or points.shape[-1] != 2:
            raise ReadError(self.path, f"entry {name!r}: points {points.shape}, occluded {occluded.shape} "
                                       f"and video {video.shape} disagree")
        visible = ~occluded
        keep = visible.any(1)
        points, visible = points[keep], visible[keep]
        video = _resize(video, self.size)
        h, w = video.shape[1:3]
        tracks = points * np.array([w, h], np.float32)
        t0 = visible.argmax(1)
        n = np.arange(len(tracks))
        query = np.stack([t0, tracks[n, t0, 1], tracks[n, t0, 0]], -1).astype(np.float32)
        return {"video": video, "tracks": tracks, "visible": visible, "query": query}


# ----------------------------------------------------------------------------- RGB-D with poses (ViSP)
class RGBDSequence:
    """An RGB-D sequence in ViSP's Castle-simu layout, cut into clips of `num_frames` frames:

        Images/Image_0001.pgm (or .png)   8-bit grey frames
        Depth/Depth_0001.bin              uint32 height, uint32 width (little endian), then
                                          height x width uint16 depth, `depth_scale` metres per unit
        CameraPose/Camera_001.txt         4 x 4 object-to-camera matrix (cMo), row major
        Config/chateau_depth.xml          <camera><px/><py/><u0/><v0/></camera> intrinsics

    The world frame is the object frame, so cam_to_world = inverse(cMo). ViSP puts pixel centres at
    integer coordinates; walt puts them at +0.5, so the principal point is shifted by half a pixel.

    The depth sensor is a second camera of the rig: `depth_from_color` maps colour-camera points
    to depth-camera points (ViSP's Castle-simu test uses a 5 cm shift along x; checked here by
    reprojecting depth between frames). The depth is registered to the colour camera — each depth
    pixel is unprojected, moved into the colour camera and splatted with a z-buffer — so `depth`,
    `video`, `intrinsics` and `cam_to_world` all describe the same camera; pixels that no depth
    sample lands on are 0. Pass depth_from_color=None for depth already in the colour camera."""

    label_names: dict = {}

    def __init__(self, root: str = CASTLE_SIMU_DIR, num_frames: int = 17, stride: int = 1,
                 depth_scale: float = 0.000030518, config: str = "Config/chateau_depth.xml",
                 depth_from_color=CASTLE_SIMU_DEPTH_FROM_COLOR):
        self.root, self.num_frames, self.stride, self.depth_scale = root, num_frames, stride, depth_scale
        self.depth_from_color = None if depth_from_color is None else np.asarray(depth_from_color, np.float64)
        img_dir = os.path.join(root, "Images")
        if not os.path.isdir(img_dir):
            raise ReadError(root, "not a ViSP RGB-D sequence (no Images/ folder)")
        frames = sorted(int(m.group(1)) for f in os.listdir(img_dir) if (m := re.match(r"Image_(\d{4})\.(pgm|png)$", f)))
        if not frames:
            raise ReadError(img_dir, "no Image_NNNN.pgm or .png frames")
        self.ext = "png" if os.path.exists(os.path.join(img_dir, f"Image_{frames[0]:04d}.png")) else "pgm"
        self.frames = frames
        span = (num_frames - 1) * stride + 1
        self.starts = list(range(0, len(frames) - span + 1, span))
        if not self.starts:
            raise ReadError(root, f"{len(frames)} frames, fewer than one clip of {num_frames} frames at stride {stride}")
        self.K = self._intrinsics(os.path.join(root, config))

    @staticmethod
    def _intrinsics(path):
        try:
            cam = ET.parse(path).getroot().find(".//camera")
            px, py, u0, v0 = (float(cam.find(k).text) for k in ("px", "py", "u0", "v0"))
        except FileNotFoundError:
            raise ReadError(path, "file not found") from None
        except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
            raise ReadError(path, f"expected <camera> with <px>, <py>, <u0>, <v0> ({e})") from None
        return np.array([[px, 0, u0 + 0.5], [0, py, v0 + 0.5], [0, 0, 1]], np.float32)

    def __len__(self):
        return len(self.starts)

    def read_depth(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ReadError(path, "file not found") from None
        if len(data) < 8:
            raise ReadError(path, "truncated depth file (no 8-byte header)")
        h, w = np.frombuffer(data[:8], "<u4")
        if len(data) != 8 + 2 * int(h) * int(w):
            need = 8 + 2 * int(h) * int(w)
            raise ReadError(path, f"truncated depth file: header says {h}x{w} needs {need} bytes, found {len(data)}")
        return np.frombuffer(data, "<u2", offset=8).reshape(int(h), int(w)).astype(np.float32) * self.depth_scale

    def register(self, depth: np.ndarray) -> np.ndarray:
        """Depth seen by the depth camera -> depth of the same surfaces seen by the colour camera."""
        if self.depth_from_color is None:
            return depth
        H, W = depth.shape
        K = self.K.astype(np.float64)
        v, u = np.nonzero(depth > 0)
        z = depth[v, u].astype(np.float64)
        p = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0] * z, (v + 0.5 - K[1, 2]) / K[1, 1] * z, z], -1)
        color_from_depth = np.linalg.inv(self.depth_from_color)
        q = p @ color_from_depth[:3, :3].T + color_from_depth[:3, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.floor(K[0, 0] * q[:, 0] / q[:, 2] + K[0, 2])
            y = np.floor(K[1, 1] * q[:, 1] / q[:, 2] + K[1, 2])
        ok = (q[:, 2] > 0) & (x >= 0) & (x < W) & (y >= 0) & (y < H)
        out = np.full(H * W, np.inf)
        np.minimum.at(out, (y[ok] * W + x[ok]).astype(np.int64), q[ok, 2])  # nearest surface wins
        out[np.isinf(out)] = 0.0
        return out.reshape(H, W).astype(np.float32)

    @staticmethod
    def read_pose(path):
        try:
            with open(path) as f:
                values = [float(v) for v in f.read().split()]
        except FileNotFoundError:
            raise ReadError(path, "file not found") from None
        except ValueError as e:
            raise ReadError(path, f"expected 16 numbers of a 4x4 pose ({e})") from None
        if len(values) != 16:
            raise ReadError(path, f"expected 16 numbers of a 4x4 pose, found {len(values)}")
        return np.array(values).reshape(4, 4)

    def load(self, i):
        from PIL import Image

        video, depth, c2w = [], [], []
        for k in range(self.num_frames):
            n = self.frames[self.starts[i] + k * self.stride]
            img_path = os.path.join(self.root, "Images", f"Image_{n:04d}.{self.ext}")
            try:
                with Image.open(img_path) as im:
                    video.append(np.asarray(im.convert("RGB")))
            except (OSError, SyntaxError) as e:
                raise ReadError(img_path, f"cannot decode image ({e})") from None
            depth.append(self.register(self.read_depth(os.path.join(self.root, "Depth", f"Depth_{n:04d}.bin"))))
            c2w.append(np.linalg.inv(self.read_pose(os.path.join(self.root, "CameraPose", f"Camera_{n:03d}.txt"))))
        T = self.num_frames
        return {"video": np.stack(video), "depth": np.stack(depth),
                "intrinsics": np.broadcast_to(self.K, (T, 3, 3)).copy(),
                "cam_to_world": np.stack(c2w).astype(np.float32)}
