"""A procedural 3D world with exact ground truth for every probe task (a small Kubric without Blender).

Each clip is a scene of analytic primitives (spheres, boxes, cylinders, scaled into six object
shapes) standing on a textured ground plane inside a backdrop sphere, lit by one directional
light with cast shadows, and ray cast on the CPU with numpy (all frames of a clip at once).

Conventions (shared by every array this module returns):
- World frame: z up, ground plane z = 0, lengths in metres.
- Camera frame: OpenCV (x right, y down, z forward). `cam_to_world` maps camera to world
  coordinates; `intrinsics` K maps camera points to pixels.
- Pixels: continuous coordinates with the origin at the top-left corner of the image, so pixel
  (row i, col j) covers [j, j+1) x [i, i+1) and its centre is (x, y) = (j + 0.5, i + 0.5).
  Rays are cast through pixel centres.
- Depth is metric z-depth (distance along the optical axis), not ray length.
- Instance mask: 0 is the static scene (ground and backdrop), k >= 1 is object k - 1; object 0 is
  the main object, the one every label is about.

`render_clip(config, split, index)` returns a dict of numpy arrays (see `render_clip`). Clip
`index` of `split` depends only on (config, split, index): the random draws come from a
`numpy.random.Generator` seeded by (seed, split, index), so it is the same on every machine and
with any number of workers.

Labels (all balanced; see `sample_labels`):
- object: shape of the main object (OBJECT_CLASSES) — visible in any frame.
- scene: environment style (SCENE_CLASSES) — visible in any frame.
- motion: what the main object does (MOTION_ACTIONS, SSv2-like). The object's position at the
  middle frame, its height, size and appearance are drawn independently of this label, so the
  middle frame carries no information about it; only the motion does.
- appearance: object class x coarse motion (APPEARANCE_ACTIONS, Kinetics-like).
- camera: camera motion (CAMERA_MOTIONS).
Directions ("left", "approach") are in the frame of the first camera, projected on the ground.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import numpy as np

OBJECT_CLASSES = ("sphere", "egg", "cube", "plank", "can", "disc")
# Primitive and half-extents (x, y, z) in units of the object's size.
SHAPES = {
    "sphere": ("sphere", (1.0, 1.0, 1.0)),
    "egg": ("sphere", (0.7, 0.7, 1.3)),
    "cube": ("box", (0.85, 0.85, 0.85)),
    "plank": ("box", (1.5, 0.45, 0.45)),
    "can": ("cylinder", (0.65, 0.65, 1.2)),
    "disc": ("cylinder", (1.25, 1.25, 0.3)),
}
SCENE_CLASSES = ("checker_hall", "meadow", "desert", "tiles", "night", "snowfield")
MOTION_ACTIONS = (
    "move_left", "move_right", "approach", "recede", "rise", "fall",
    "spin_clockwise", "spin_counterclockwise", "bounce", "still",
)
# The temporal half of the appearance label: whether the other objects in the clip move ("busy":
# each glides or spins) or all stand still ("calm"). Independent of the main object's motion.
ACTIVITIES = ("calm", "busy")
APPEARANCE_ACTIONS = tuple(f"{o}_{a}" for o in OBJECT_CLASSES for a in ACTIVITIES)
CAMERA_MOTIONS = ("static", "pan_left", "pan_right", "orbit_left", "orbit_right", "dolly_in", "dolly_out")
# Procedural surface patterns of the main object (a fine-grained, iNat-like task): pattern kind x
# frequency (cycles per texture unit; a sphere's u runs once around it, a box face is one unit).
TEXTURE_CLASSES = tuple(f"{k}_{f}" for k in ("stripes_u", "stripes_v", "stripes_diag", "checker", "dots", "grid")
                        for f in (3, 6))
LABEL_NAMES = {
    "object": OBJECT_CLASSES,
    "scene": SCENE_CLASSES,
    "motion": MOTION_ACTIONS,
    "appearance": APPEARANCE_ACTIONS,
    "camera": CAMERA_MOTIONS,
    "texture": TEXTURE_CLASSES,
}
SPLITS = ("train", "val", "test")

BACKDROP_RADIUS = 40.0
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_EPS = 1e-4


@dataclass
class WorldConfig:
    """Everything that decides what a clip looks like. Same config + split + index = same clip."""

    seed: int = 0
    frames: int = 17
    height: int = 64
    width: int = 64
    fov_degrees: float = 50.0
    max_objects: int = 4  # main object + up to 3 distractors; arrays are padded to this
    track_points: int = 64  # query points per clip for point tracking
    # "procedural", "fashion" (Fashion-MNIST images on objects; needs dataset-fashion-mnist), or
    # "auto" (fashion when installed). Only texture pixels depend on it, never geometry or labels.
    textures: str = "auto"

    def resolved(self) -> "WorldConfig":
        """The config with `textures` made concrete, which is what a dataset records."""
        if self.textures == "auto":
            have = os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
            return dataclasses.replace(self, textures="fashion" if have else "procedural")
        if self.textures not in ("procedural", "fashion"):
            raise ValueError(f"WorldConfig.textures must be 'auto', 'procedural' or 'fashion', got {self.textures!r}.")
        return self


# ----------------------------------------------------------------------------- labels
def _block_balanced(seed: int, split: int, index: int, task: int, n: int) -> int:
    """Class of clip `index` for a task with n classes: every block of n consecutive clips holds each
    class once, in a seeded order. Exactly balanced, and independent of the split's size."""
    block, pos = divmod(index, n)
    order = np.random.default_rng([seed, split, task, block, 7]).permutation(n)
    return int(order[pos])


def sample_labels(config: WorldConfig, split: str, index: int) -> dict[str, int]:
    s = SPLITS.index(split)
    # One draw over (object, activity) pairs balances object and appearance at once.
    pair = _block_balanced(config.seed, s, index, 0, len(OBJECT_CLASSES) * len(ACTIVITIES))
    obj, activity = divmod(pair, len(ACTIVITIES))
    return {
        "object": obj,
        "scene": _block_balanced(config.seed, s, index, 2, len(SCENE_CLASSES)),
        "motion": _block_balanced(config.seed, s, index, 1, len(MOTION_ACTIONS)),
        "appearance": pair,
        "camera": _block_balanced(config.seed, s, index, 3, len(CAMERA_MOTIONS)),
        "texture": _block_balanced(config.seed, s, index, 4, len(TEXTURE_CLASSES)),
    }


# ----------------------------------------------------------------------------- geometry helpers
def _rot_z(angle):
    """(..., 3, 3) rotations about the world z axis by `angle` radians (counterclockwise from above)."""
    c, s = np.cos(angle), np.sin(angle)
    z, o = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def look_at(eye, target):
    """Camera-to-world rotation (OpenCV axes) of a camera at `eye` looking at `target`, z up."""
    f = target - eye
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r = r / np.linalg.norm(r)
    return np.stack([r, np.cross(f, r), f], axis=1)


def rigid(rotation, translation):
    m = np.zeros(rotation.shape[:-2] + (4, 4))
    m[..., :3, :3] = rotation
    m[..., :3, 3] = translation
    m[..., 3, 3] = 1.0
    return m


def project(points_world, cam_to_world, intrinsics):
    """Pixels (..., 2) and z-depth (...) of world points (..., 3) in cameras broadcast over `...`."""
    R, C = cam_to_world[..., :3, :3], cam_to_world[..., :3, 3]
    p = np.einsum("...ji,...j->...i", R, points_world - C)
    z = p[..., 2]
    safe = np.where(np.abs(z) < 1e-9, 1e-9, z)
    u = intrinsics[..., 0, 0] * p[..., 0] / safe + intrinsics[..., 0, 2]
    v = intrinsics[..., 1, 1] * p[..., 1] / safe + intrinsics[..., 1, 2]
    return np.stack([u, v], -1), z


def unproject(pixels, depth, cam_to_world, intrinsics):
    """World points (..., 3) of pixels (..., 2) with z-depth (...) seen by cameras broadcast over `...`."""
    x = (pixels[..., 0] - intrinsics[..., 0, 2]) / intrinsics[..., 0, 0] * depth
    y = (pixels[..., 1] - intrinsics[..., 1, 2]) / intrinsics[..., 1, 1] * depth
    cam = np.stack([x, y, depth], -1)
    return np.einsum("...ij,...j->...i", cam_to_world[..., :3, :3], cam) + cam_to_world[..., :3, 3]


# ----------------------------------------------------------------------------- ray casting
def _intersect_local(kind, o, d):
    """Distance t along world rays to a unit primitive, given rays already mapped into its local frame
    (o + t d in local coordinates is the world point o_w + t d_w). np.inf where missed."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "sphere":
            a = (d * d).sum(-1)
            b = (o * d).sum(-1)
            c = (o * o).sum(-1) - 1.0
            disc = b * b - a * c
            t = (-b - np.sqrt(disc)) / a
            return np.where((disc >= 0) & (t > _EPS), t, np.inf)
        if kind == "box":
            t1 = (-1.0 - o) / d
            t2 = (1.0 - o) / d
            tmin = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf).max(-1)
            tmax = np.nan_to_num(np.maximum(t1, t2), nan=np.inf).min(-1)
            t = np.where(tmin > _EPS, tmin, tmax)
            return np.where((tmax >= tmin) & (t > _EPS), t, np.inf)
        if kind == "cylinder":  # radius 1 around the z axis, |z| <= 1, with caps
            a = d[..., 0] ** 2 + d[..., 1] ** 2
            b = o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1]
            c = o[..., 0] ** 2 + o[..., 1] ** 2 - 1.0
            disc = b * b - a * c
            ts = (-b - np.sqrt(disc)) / a
            zs = o[..., 2] + ts * d[..., 2]
            ts = np.where((disc >= 0) & (np.abs(zs) <= 1.0) & (ts > _EPS), ts, np.inf)
            best = ts
            for cap in (-1.0, 1.0):
                tc = (cap - o[..., 2]) / d[..., 2]
                xc = o[..., 0] + tc * d[..., 0]
                yc = o[..., 1] + tc * d[..., 1]
                tc = np.where((xc * xc + yc * yc <= 1.0) & (tc > _EPS), tc, np.inf)
                best = np.minimum(best, tc)
            return best
    raise ValueError(f"unknown primitive {kind!r}")


def _local_normal_uv(kind, p):
    """Unit-primitive surface normals (local, unnormalized for scale) and texture coordinates."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if kind == "sphere":
        u = np.arctan2(y, x) / (2 * np.pi) + 0.5
        v = np.arccos(np.clip(z, -1, 1)) / np.pi
        return p, u, v
    if kind == "box":
        axis = np.abs(p).argmax(-1)
        n = np.zeros_like(p)
        np.put_along_axis(n, axis[..., None], np.sign(np.take_along_axis(p, axis[..., None], -1)), -1)
        u = np.where(axis == 0, y, x)
        v = np.where(axis == 2, y, z)
        return n, (u + 1) / 2, (v + 1) / 2
    # cylinder
    cap = np.abs(z) > 1.0 - 1e-3
    n = np.where(cap[..., None], np.stack([0 * x, 0 * y, np.sign(z)], -1), np.stack([x, y, 0 * z], -1))
    u = np.where(cap, (x + 1) / 2, np.arctan2(y, x) / (2 * np.pi) + 0.5)
    v = np.where(cap, (y + 1) / 2, (z + 1) / 2)
    return n, u, v


@dataclass
class _Object:
    kind: str
    half: np.ndarray  # (3,) half-extents in metres
    rot: np.ndarray  # (T, 3, 3) object-to-world rotation per frame
    pos: np.ndarray  # (T, 3) centre per frame
    texture: np.ndarray  # (S, S, 3) float32 in [0, 1]
    tiles: float  # texture repeats across the surface

    def to_local(self, origins, dirs, frames=None):
        """Map world rays into the unit-primitive frame: rays (T, P, 3) with one pose per frame, or
        rays (P, 3) whose frame indices are `frames` (P,)."""
        if frames is None:
            rot, pos = self.rot[:, None], self.pos[:, None]
        else:
            rot, pos = self.rot[frames], self.pos[frames]
        o = np.einsum("...ji,...j->...i", rot, origins - pos) / self.half
        d = np.einsum("...ji,...j->...i", rot, dirs) / self.half
        return o, d


def _scene_surfaces(objects, origins, dirs):
    """Nearest hit among objects and the ground: (t, owner) with owner -1 = ground, k = object k,
    and t = inf where the ray reaches the backdrop."""
    t_best = np.full(origins.shape[:-1], np.inf)
    owner = np.full(origins.shape[:-1], -2, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = -origins[..., 2] / dirs[..., 2]
    tg = np.where(tg > _EPS, tg, np.inf)
    hit = tg < t_best
    t_best, owner = np.where(hit, tg, t_best), np.where(hit, -1, owner)
    for k, ob in enumerate(objects):
        o, d = ob.to_local(origins, dirs)
        t = _intersect_local(ob.kind, o, d)
        hit = t < t_best
        t_best, owner = np.where(hit, t, t_best), np.where(hit, k, owner)
    return t_best, owner


def _backdrop_t(origins, dirs):
    """Distance to the inside of the backdrop sphere (always hit from inside)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - BACKDROP_RADIUS**2
    return -b + np.sqrt(b * b - c)


# ----------------------------------------------------------------------------- textures and styles
@functools.lru_cache(maxsize=1)
def _fashion_images():
    from walt.data.readers import read_idx

    return read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))


def _pattern(name, phase, n=32):
    """(n, n) weights in {0, 1} of a TEXTURE_CLASSES pattern over one texture unit."""
    kind, freq = name.rsplit("_", 1)
    f = float(freq)
    yy, xx = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    x, y = xx * f + phase[0], yy * f + phase[1]
    if kind == "stripes_u":
        w = (x % 1) < 0.5
    elif kind == "stripes_v":
        w = (y % 1) < 0.5
    elif kind == "stripes_diag":
        w = ((x + yy * f) % 1) < 0.5
    elif kind == "checker":
        w = (np.floor(x) + np.floor(y)) % 2 == 1
    elif kind == "dots":
        w = (x % 1 - 0.5) ** 2 + (y % 1 - 0.5) ** 2 < 0.09
    elif kind == "grid":
        w = (np.abs(x % 1 - 0.5) > 0.33) | (np.abs(y % 1 - 0.5) > 0.33)
    else:
        raise ValueError(f"unknown texture {name!r}")
    return w.astype(np.float32)


def _texture(rng, mode, pattern=None):
    """A (32, 32, 3) object texture and its pattern class: TEXTURE_CLASSES[pattern] when given (the
    main object, in every mode), else a random pattern, or a Fashion-MNIST image in "fashion" mode.
    The same random draws are made in any case, so the mode changes texture pixels only."""
    c1, c2 = rng.uniform(0.15, 1.0, 3), rng.uniform(0.0, 0.85, 3)
    drawn = int(rng.integers(len(TEXTURE_CLASSES)))
    phase = rng.uniform(0, 1, 2)
    fashion_index = rng.integers(10000)
    lum = np.array([0.3, 0.59, 0.11])
    if abs((c1 - c2) @ lum) < 0.3:  # keep the pattern's two tones apart, whatever the colours
        c1, c2 = (np.maximum(c1, c2) * 0.5 + 0.5, np.minimum(c1, c2) * 0.4) if c1 @ lum >= c2 @ lum else \
            (np.minimum(c1, c2) * 0.4, np.maximum(c1, c2) * 0.5 + 0.5)
    if pattern is None and mode == "fashion":
        img = _fashion_images()[fashion_index].astype(np.float32) / 255.0
        w = np.pad(img, 2, mode="edge")  # 28x28 -> 32x32
        c2 = 0.35 + 0.5 * c2  # the images' black backgrounds become a light tint, not a dark blotch
    else:
        w = _pattern(TEXTURE_CLASSES[drawn if pattern is None else pattern], phase)
    w = w[..., None]
    return (c1 * w + c2 * (1 - w)).astype(np.float32)


def _style(scene, rng, view_azimuth):
    """Ground colours/pattern, sky colours and light of an environment style (lightly jittered).
    The light comes from behind the middle frame's camera (within 90 degrees), so objects mostly
    face it lit; the wide range keeps an orbit's end frames from showing which way it went."""
    j = lambda c: np.clip(np.asarray(c) + rng.uniform(-0.05, 0.05, 3), 0, 1)  # noqa: E731
    styles = {
        "checker_hall": dict(g1=(0.85, 0.85, 0.82), g2=(0.25, 0.25, 0.28), pattern="checker", scale=1.0,
                             sky_lo=(0.80, 0.78, 0.72), sky_hi=(0.55, 0.52, 0.48), ambient=0.45),
        "meadow": dict(g1=(0.25, 0.55, 0.18), g2=(0.15, 0.38, 0.10), pattern="noise", scale=0.7,
                       sky_lo=(0.75, 0.85, 0.95), sky_hi=(0.25, 0.45, 0.85), ambient=0.4),
        "desert": dict(g1=(0.90, 0.75, 0.50), g2=(0.75, 0.58, 0.35), pattern="dunes", scale=1.3,
                       sky_lo=(0.95, 0.85, 0.70), sky_hi=(0.45, 0.65, 0.90), ambient=0.35),
        "tiles": dict(g1=(0.70, 0.35, 0.25), g2=(0.92, 0.90, 0.85), pattern="grid", scale=0.8,
                      sky_lo=(0.90, 0.90, 0.92), sky_hi=(0.70, 0.72, 0.78), ambient=0.5),
        "night": dict(g1=(0.10, 0.12, 0.25), g2=(0.30, 0.35, 0.65), pattern="grid", scale=1.5,
                      sky_lo=(0.08, 0.08, 0.20), sky_hi=(0.01, 0.01, 0.05), ambient=0.25),
        "snowfield": dict(g1=(0.95, 0.96, 1.00), g2=(0.80, 0.84, 0.92), pattern="noise", scale=1.6,
                          sky_lo=(0.85, 0.88, 0.92), sky_hi=(0.60, 0.66, 0.75), ambient=0.55),
    }
    st = dict(styles[SCENE_CLASSES[scene]])
    for key in ("g1", "g2", "sky_lo", "sky_hi"):
        st[key] = j(st[key])
    st["offset"] = rng.uniform(0, 10, 2)
    az = view_azimuth + np.pi + rng.uniform(-np.pi / 2, np.pi / 2)
    el = rng.uniform(np.radians(35), np.radians(65))
    st["light"] = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return st


def _ground_albedo(st, x, y):
    x = x / st["scale"] + st["offset"][0]
    y = y / st["scale"] + st["offset"][1]
    p = st["pattern"]
    if p == "checker":
        w = (np.floor(x) + np.floor(y)) % 2
    elif p == "grid":
        w = ((np.abs(x - np.round(x)) < 0.06) | (np.abs(y - np.round(y)) < 0.06)).astype(float)
    elif p == "dunes":
        w = 0.5 + 0.5 * np.sin(3.0 * x + 1.5 * np.sin(1.3 * y))
    else:  # smooth value-like noise from a few sines
        w = 0.5 + 0.25 * (np.sin(2.1 * x + 3.1 * np.sin(0.7 * y)) + np.sin(2.7 * y + 2.3 * np.sin(0.9 * x)))
    w = w[..., None]
    return st["g1"] * w + st["g2"] * (1 - w)


def _sky(st, dirs):
    h = np.clip(dirs[..., 2:3], 0, 1) ** 0.6
    return st["sky_lo"] * (1 - h) + st["sky_hi"] * h


# ----------------------------------------------------------------------------- scene sampling
# Every motion is centred on the middle frame (s = -1/2 .. 1/2 over the clip) and every frame's
# state is spread widely around it, so that no single frame tells which way a clip goes: a motion of
# total size m against a spread of width L shifts a frame's distribution by at most m / 2, which a
# classifier can exploit in a fraction ~m / (2 L) of clips. The sizes below keep that near 0.1
# while the motion stays plainly visible (~10 px at 64 x 64). Image-plane sizes are in units of
# the half-width of the view (tan(fov / 2) x depth).
VIEW_LATERAL = 0.72  # the main object's centre at the middle frame: |x| <= this (image units)
DEPTH_RANGE = (3.6, 8.0)  # its ground distance ahead of the camera at the middle frame, metres
SIDEWAYS = 0.30  # move_left / move_right: total sideways motion, image units
IN_DEPTH = 1.0  # approach / recede: total change of distance, metres
RISE = 0.10  # rise / fall: total change of height as a fraction of the distance
HOVER = (RISE / 2, 0.17)  # lowest height of the bottom (fraction of distance): hop base
HOP = (0.14, 0.24)  # hop height (fraction of distance); every clip draws one, only bounce plays it
SPIN_DEGREES = (100.0, 130.0)  # total turn of a spin (under 180 - orbit, so two frames tell its sense)
PAN_DEGREES = 7.0
ORBIT_DEGREES = 22.0  # about a vertical axis through the main object's middle-frame position
DOLLY_METRES = 0.8


def _reference_camera(rng):
    """Eye and camera-to-world rotation of the middle frame's camera, before its motion: at a random
    height and heading above the world origin, pitched down towards the middle of the object range."""
    az = rng.uniform(0, 2 * np.pi)
    height = rng.uniform(1.6, 2.6)
    pitch = np.arctan2(height - 0.9, 5.8) + np.radians(rng.uniform(-3, 3))
    eye = np.array([0.0, 0.0, height])
    fwd = np.array([np.cos(pitch) * np.cos(az), np.cos(pitch) * np.sin(az), -np.sin(pitch)])
    return eye, look_at(eye, eye + fwd), az


def _camera_path(rng, label, T, eye, rot, pivot):
    """Per-frame camera centres (T, 3) and camera-to-world rotations (T, 3, 3): the reference camera
    moved by the label's motion, centred on the middle of the clip."""
    mag = rng.uniform(0.8, 1.0)
    s = np.linspace(-0.5, 0.5, T)
    name = CAMERA_MOTIONS[label]
    sign = 1.0 if name.endswith(("left", "in")) else -1.0
    eyes, rots = np.tile(eye, (T, 1)), np.tile(rot, (T, 1, 1))
    if name.startswith("orbit"):  # circle the pivot; a clockwise turn (from above) moves the camera left
        turn = _rot_z(-sign * np.radians(ORBIT_DEGREES) * mag * s)
        eyes = pivot + np.einsum("tij,j->ti", turn, eye - pivot)
        rots = turn @ rot
    if name.startswith("dolly"):  # move along the viewing direction
        eyes = eye + sign * DOLLY_METRES * mag * s[:, None] * rot[:, 2]
    if name.startswith("pan"):  # turn in place about the world vertical; positive = to the left
        rots = _rot_z(sign * np.radians(PAN_DEGREES) * mag * s) @ rot
    return eyes, rots


def _hop(phase):
    """Height profile of a bounce, in [0, 1]: parabolic arcs that touch 0 at integer phases."""
    f = phase % 1.0
    return 4 * f * (1 - f)


def _main_trajectory(rng, label, T, half_z, eye, rot, fov):
    """Centres (T, 3) and yaw angles (T,) of the main object for a motion label, in the world.

    The state at the middle frame is drawn identically for every label and widely: sideways
    position across the view, distance, hover height (a hop base plus a hop height at a random
    phase of its bounce: a bouncing object's height at any frame has exactly the distribution every
    other object's has), yaw uniform. The motion is then centred on the middle frame."""
    right = rot[:, 0] * [1, 1, 0]
    right /= np.linalg.norm(right)
    fwd = rot[:, 2] * [1, 1, 0]
    fwd /= np.linalg.norm(fwd)
    depth = rng.uniform(*DEPTH_RANGE)
    lateral = rng.uniform(-VIEW_LATERAL, VIEW_LATERAL)
    base, hop, phase = rng.uniform(*HOVER), rng.uniform(*HOP), rng.uniform(0, 1)
    yaw0 = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.8, 1.0)
    spin = np.radians(rng.uniform(*SPIN_DEGREES))
    s = np.linspace(-0.5, 0.5, T)  # 0 at the middle frame
    name = MOTION_ACTIONS[label]
    unit = np.tan(np.radians(fov) / 2)  # image units -> metres per metre of depth
    d = depth + {"approach": -1, "recede": 1}.get(name, 0) * IN_DEPTH * speed * s
    x = lateral * unit * depth + {"move_left": -1, "move_right": 1}.get(name, 0) * SIDEWAYS * speed * s * unit * depth
    h = (base + hop * _hop(phase)) * depth + {"rise": 1, "fall": -1}.get(name, 0) * RISE * speed * s * depth
    if name == "bounce":  # 1.5 hops over the clip, from the drawn phase
        h = (base + hop * _hop(phase + 1.5 * s)) * depth
    centres = eye * [1, 1, 0] + np.asarray(d)[..., None] * fwd + np.asarray(x)[..., None] * right
    centres = np.broadcast_to(centres, (T, 3)).copy()
    centres[:, 2] = half_z + h
    yaw = np.full(T, yaw0)
    if name == "spin_clockwise":  # seen from above
        yaw = yaw0 - spin * s
    elif name == "spin_counterclockwise":
        yaw = yaw0 + spin * s
    return centres, yaw


def _distractor_trajectory(rng, T, radius, eye, rot, fov, busy, keep_clear):
    """A distractor resting on the ground somewhere in view, clear of the paths in `keep_clear`
    (list of (points (T, 2), radius)); in a busy clip it glides or spins, else it stands still."""
    right = rot[:, 0] * [1, 1, 0]
    right /= np.linalg.norm(right)
    fwd = rot[:, 2] * [1, 1, 0]
    fwd /= np.linalg.norm(fwd)
    unit = np.tan(np.radians(fov) / 2)
    glide = busy and rng.uniform() < 0.6
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.6, 1.0) if glide else 0.0
    turn = np.radians(rng.uniform(120, 200)) * rng.choice([-1, 1]) if busy and not glide else 0.0
    yaw0 = rng.uniform(0, 2 * np.pi)
    s = np.linspace(-0.5, 0.5, T)
    step = length * np.array([np.cos(heading), np.sin(heading)])
    for attempt in range(40):
        depth = rng.uniform(3.0, 9.0) if attempt < 39 else rng.uniform(11.0, 13.0)  # last resort: far away
        lateral = rng.uniform(-0.85, 0.85) * unit * depth
        mid = eye[:2] + depth * fwd[:2] + lateral * right[:2]
        path = mid + s[:, None] * step
        if attempt == 39 or all(np.linalg.norm(path[:, None] - other[None], axis=-1).min() > radius + r + 0.15
                                for other, r in keep_clear):
            break
    pos = np.concatenate([path, np.zeros((T, 1))], -1)
    return pos, yaw0 + turn * s


def _sample_scene(config: WorldConfig, split: str, index: int):
    cfg = config.resolved()
    labels = sample_labels(cfg, split, index)
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, 1])
    T = cfg.frames
    eye, rot, view_az = _reference_camera(rng)
    style = _style(labels["scene"], rng, view_az)
    n_distract = int(rng.integers(1, cfg.max_objects)) if cfg.max_objects > 1 else 0
    busy = ACTIVITIES[labels["appearance"] % len(ACTIVITIES)] == "busy"
    objects, classes, clear = [], [], []
    for k in range(1 + n_distract):
        cls = labels["object"] if k == 0 else int(rng.integers(len(OBJECT_CLASSES)))
        kind, half = SHAPES[OBJECT_CLASSES[cls]]
        size = rng.uniform(0.55, 0.7) if k == 0 else rng.uniform(0.3, 0.5)
        half = np.array(half) * size
        tex = _texture(rng, cfg.textures, labels["texture"] if k == 0 else None)
        tiles = 1.0 if k == 0 else float(rng.integers(1, 3))
        radius = float(np.hypot(half[0], half[1]))
        if k == 0:
            pos, yaw = _main_trajectory(rng, labels["motion"], T, half[2], eye, rot, cfg.fov_degrees)
        else:
            pos, yaw = _distractor_trajectory(rng, T, radius, eye, rot, cfg.fov_degrees, busy, clear)
            pos[:, 2] = half[2]
        clear.append((pos[:, :2], radius))
        objects.append(_Object(kind, half, _rot_z(yaw), pos, tex, tiles))
        classes.append(cls)
    pivot = objects[0].pos[T // 2] * [1, 1, 0]
    eyes, cam_rots = _camera_path(rng, labels["camera"], T, eye, rot, pivot)
    return cfg, labels, eyes, cam_rots, style, objects, classes, rng


# ----------------------------------------------------------------------------- rendering
def _intrinsics(cfg):
    f = 0.5 * cfg.width / np.tan(np.radians(cfg.fov_degrees) / 2)
    return np.array([[f, 0, cfg.width / 2], [0, f, cfg.height / 2], [0, 0, 1.0]])


def _surface_samples(kind, n=24):
    """Points on a unit primitive dense enough that their projected extent is its silhouette's."""
    if kind == "sphere":
        i = np.arange(n * n) + 0.5
        z = 1 - 2 * i / (n * n)
        phi = np.pi * (1 + 5**0.5) * i
        return np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], -1)
    if kind == "box":  # the 12 edges hold every extreme point of a box's projection
        g = np.linspace(-1, 1, n)
        pts = []
        for a in range(3):
            for s1 in (-1, 1):
                for s2 in (-1, 1):
                    e = np.zeros((n, 3))
                    e[:, a] = g
                    e[:, (a + 1) % 3], e[:, (a + 2) % 3] = s1, s2
                    pts.append(e)
        return np.concatenate(pts)
    th = np.linspace(0, 2 * np.pi, 4 * n, endpoint=False)  # cylinder: its two rims
    ring = np.stack([np.cos(th), np.sin(th)], -1)
    return np.concatenate([np.concatenate([ring, np.full((4 * n, 1), z)], -1) for z in (-1.0, 1.0)])


def render_clip(config: WorldConfig, split: str, index: int) -> dict[str, np.ndarray]:
    """Render clip `index` of `split`. Returns (T frames, H x W pixels, O = config.max_objects):

    video (T,H,W,3) uint8; depth (T,H,W) float32 metres; mask (T,H,W) uint8 (0 scene, k+1 object k);
    intrinsics (T,3,3) and cam_to_world (T,4,4) float32; object_to_world (T,O,4,4) float32 (rigid,
    without the shape's scale); object_present (O,) bool; object_class (O,) int64 (-1 absent);
    boxes (T,O,4) float32 (x0, y0, x1, y1) amodal, clipped to the image; box_valid (T,O) bool;
    query (N,3) float32 (t, y, x) with the query pixel's centre; tracks (N,T,2) float32 (x, y);
    visible (N,T) bool; track_depth (N,T) float32; track_owner (N,) int64 (0 scene, k+1 object k);
    labels (6,) int64 in the order of LABEL_NAMES.
    """
    cfg, labels, eyes, cam_rots, st, objects, classes, rng = _sample_scene(config, split, index)
    T, H, W, O = cfg.frames, cfg.height, cfg.width, cfg.max_objects
    K = _intrinsics(cfg)

    # Primary rays through every pixel centre of every frame: (T, P, 3).
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d_cam = np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1).reshape(-1, 3)
    d_len = np.linalg.norm(d_cam, axis=-1)
    dirs = np.einsum("tij,pj->tpi", cam_rots, d_cam / d_len[:, None])
    origins = np.broadcast_to(eyes[:, None], dirs.shape)
    t_hit, owner = _scene_surfaces(objects, origins, dirs)
    sky = ~np.isfinite(t_hit)
    t_hit = np.where(sky, _backdrop_t(origins, dirs), t_hit)
    points = origins + t_hit[..., None] * dirs

    # Shading: albedo x (ambient + direct light unless a shadow ray hits an object).
    albedo = np.zeros(points.shape)
    normal = np.zeros(points.shape)
    normal[..., 2] = 1.0
    ground = owner == -1
    albedo[ground] = _ground_albedo(st, points[ground][:, 0], points[ground][:, 1])
    for k, ob in enumerate(objects):
        sel = owner == k
        if not sel.any():
            continue
        tsel = np.nonzero(sel)[0]  # frame of each selected pixel
        local, _ = ob.to_local(points[sel], dirs[sel], tsel)
        n_loc, u, v = _local_normal_uv(ob.kind, local)
        n_w = np.einsum("pij,pj->pi", ob.rot[tsel], n_loc / ob.half)
        normal[sel] = n_w / np.linalg.norm(n_w, axis=-1, keepdims=True)
        S = ob.texture.shape[0]
        ui = ((u * ob.tiles % 1.0) * S).astype(np.int64).clip(0, S - 1)
        vi = ((v * ob.tiles % 1.0) * S).astype(np.int64).clip(0, S - 1)
        albedo[sel] = ob.texture[vi, ui]
    light = st["light"]
    lit = ~sky
    shadow_o = points[lit] + normal[lit] * 1e-3
    t_idx = np.nonzero(lit)[0]
    in_shadow = np.zeros(len(shadow_o), bool)
    for ob in objects:
        o, d = ob.to_local(shadow_o, np.broadcast_to(light, shadow_o.shape), t_idx)
        in_shadow |= np.isfinite(_intersect_local(ob.kind, o, d))
    lambert = np.clip((normal[lit] * light).sum(-1), 0, 1) * ~in_shadow
    rgb = np.zeros(points.shape)
    rgb[lit] = albedo[lit] * (st["ambient"] + (1 - st["ambient"]) * 1.1 * lambert)[:, None]
    rgb[sky] = _sky(st, dirs[sky])
    video = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(T, H, W, 3)
    depth = (t_hit / d_len).astype(np.float32).reshape(T, H, W)
    mask = np.where(owner >= 0, owner + 1, 0).astype(np.uint8).reshape(T, H, W)

    cam_to_world = rigid(cam_rots, eyes)
    obj_to_world = np.tile(np.eye(4), (T, O, 1, 1))
    present = np.zeros(O, bool)
    obj_class = np.full(O, -1, np.int64)
    boxes = np.zeros((T, O, 4))
    box_valid = np.zeros((T, O), bool)
    for k, ob in enumerate(objects):
        obj_to_world[:, k] = rigid(ob.rot, ob.pos)
        present[k], obj_class[k] = True, classes[k]
        surf = _surface_samples(ob.kind) * ob.half
        world = np.einsum("tij,pj->tpi", ob.rot, surf) + ob.pos[:, None]
        uv, _ = project(world, cam_to_world[:, None], K)
        lo = np.clip(uv.min(1), 0, [W, H])
        hi = np.clip(uv.max(1), 0, [W, H])
        boxes[:, k] = np.concatenate([lo, hi], -1)
        box_valid[:, k] = (hi - lo > 0).all(-1)

    query, tracks, visible, track_depth, track_owner = _point_tracks(
        cfg, rng, objects, mask, points.reshape(T, H, W, 3), sky.reshape(T, H, W), obj_to_world, cam_to_world, K)
    return {
        "video": video,
        "depth": depth,
        "mask": mask,
        "intrinsics": np.broadcast_to(K, (T, 3, 3)).astype(np.float32),
        "cam_to_world": cam_to_world.astype(np.float32),
        "object_to_world": obj_to_world.astype(np.float32),
        "object_present": present,
        "object_class": obj_class,
        "boxes": boxes.astype(np.float32),
        "box_valid": box_valid,
        "query": query.astype(np.float32),
        "tracks": tracks.astype(np.float32),
        "visible": visible,
        "track_depth": track_depth.astype(np.float32),
        "track_owner": track_owner,
        "labels": np.array([labels[k] for k in LABEL_NAMES], np.int64),
    }


def _point_tracks(cfg, rng, objects, mask, points, sky, obj_to_world, cam_to_world, K):
    """Sample query pixels on visible surfaces (half on objects when any are seen), follow their
    3D points through every frame, and flag them visible when in the image and not occluded (an
    exact ray cast from the camera to the point, not a depth-map lookup)."""
    T, H, W = mask.shape
    N = cfg.track_points
    fg = np.argwhere(mask > 0)
    bg = np.argwhere((mask == 0) & ~sky)
    n_fg = min(N // 2, len(fg)) if len(fg) else 0
    picks = np.concatenate([fg[rng.integers(len(fg), size=n_fg)] if n_fg else np.zeros((0, 3), int),
                            bg[rng.integers(len(bg), size=N - n_fg)]])
    tq, iq, jq = picks.T
    owner = mask[tq, iq, jq].astype(np.int64)
    p_query = points[tq, iq, jq]
    # Each point is fixed in its owner's rigid frame: local = inverse(pose at query frame) @ world.
    pose_q = np.where(owner[:, None, None] > 0, obj_to_world[tq, np.maximum(owner - 1, 0)], np.eye(4))
    local = np.einsum("nji,nj->ni", pose_q[:, :3, :3], p_query - pose_q[:, :3, 3])
    pose_all = np.where(owner[:, None, None, None] > 0, obj_to_world[:, np.maximum(owner - 1, 0)].transpose(1, 0, 2, 3),
                        np.eye(4))  # (N, T, 4, 4)
    world = np.einsum("ntij,nj->nti", pose_all[..., :3, :3], local) + pose_all[..., :3, 3]
    uv, z = project(world, cam_to_world[None], K)
    inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    # Occlusion: first surface hit on the segment camera -> point, per (point, frame).
    eyes = np.broadcast_to(cam_to_world[None, :, :3, 3], world.shape)
    seg = world - eyes
    dist = np.linalg.norm(seg, axis=-1)
    dirs = seg / dist[..., None]
    flat = lambda a: a.transpose(1, 0, *range(2, a.ndim)).reshape(T, N, *a.shape[2:])  # noqa: E731
    t_first, _ = _scene_surfaces(objects, flat(eyes).copy(), flat(dirs))
    unoccluded = flat(dist) <= t_first + 1e-4 * flat(dist) + 1e-5
    visible = inside & unoccluded.T
    query = np.stack([tq, iq + 0.5, jq + 0.5], -1)
    return query, uv, visible, z, owner
