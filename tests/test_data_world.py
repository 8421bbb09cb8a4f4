"""The procedural world: geometry, occlusion, boxes and labels agree with what is rendered."""
import numpy as np
import pytest

from walt.data import world as W
from walt.data.world import CAMERA_MOTIONS, MOTION_ACTIONS, WorldConfig, render_clip, sample_labels

CFG = WorldConfig(seed=3, textures="procedural")


def _find(split, want, start=0, cfg=CFG):
    """First clip index whose labels contain `want` (labels are cheap to sample, no rendering)."""
    for i in range(start, start + 5000):
        lab = sample_labels(cfg, split, i)
        if all(lab[k] == v for k, v in want.items()):
            return i
    raise AssertionError(f"no clip with {want}")


@pytest.fixture(scope="module")
def clips():
    """One clip per camera motion, with assorted object motions."""
    return [render_clip(CFG, "train", _find("train", {"camera": c})) for c in range(len(CAMERA_MOTIONS))]


def _unproject(px, depth, K, c2w):
    x = (px[..., 0] - K[0, 2]) / K[0, 0] * depth
    y = (px[..., 1] - K[1, 2]) / K[1, 1] * depth
    cam = np.stack([x, y, depth], -1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _project(p, K, c2w):
    cam = (p - c2w[:3, 3]) @ c2w[:3, :3]
    u = K[0, 0] * cam[..., 0] / cam[..., 2] + K[0, 2]
    v = K[1, 1] * cam[..., 1] / cam[..., 2] + K[1, 2]
    return np.stack([u, v], -1), cam[..., 2]


def test_shapes_and_dtypes(clips):
    c = clips[0]
    T, H, Wd, O, N = CFG.frames, CFG.height, CFG.width, CFG.max_objects, CFG.track_points
    assert c["video"].shape == (T, H, Wd, 3) and c["video"].dtype == np.uint8
    assert c["depth"].shape == (T, H, Wd) and np.isfinite(c["depth"]).all() and (c["depth"] > 0).all()
    assert c["tracks"].shape == (N, T, 2) and c["visible"].shape == (N, T)
    assert c["boxes"].shape == (T, O, 4) and c["object_to_world"].shape == (T, O, 4, 4)
    R = c["cam_to_world"][:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)


def test_unprojected_depth_follows_rigid_motion_to_the_track(clips):
    """Query pixel + its depth -> 3D -> its object's rigid motion (identity for the scene) ->
    projection into frame k lands on the recorded track wherever the point is visible."""
    _check_tracks(clips)


def _check_tracks(clips):
    checked = 0
    for c in clips:
        K, c2w, o2w = (c[k].astype(np.float64) for k in ("intrinsics", "cam_to_world", "object_to_world"))
        for n, (tq, y, x) in enumerate(c["query"]):
            tq, i, j = int(tq), int(y), int(x)
            assert (x, y) == (j + 0.5, i + 0.5)
            p = _unproject(np.array([x, y]), c["depth"][tq, i, j], K[tq], c2w[tq])
            owner = c["mask"][tq, i, j]
            if owner:  # into the object's frame at the query time, then out at every frame
                local = np.linalg.inv(o2w[tq, owner - 1]) @ np.append(p, 1.0)
                world = (o2w[:, owner - 1] @ local)[:, :3]
            else:
                world = np.broadcast_to(p, (len(K), 3))
            uv = np.stack([_project(world[k], K[k], c2w[k])[0] for k in range(len(K))])
            vis = c["visible"][n]
            assert vis[tq], "a query point is visible in its own frame"
            err = np.abs(uv[vis] - c["tracks"][n][vis]).max()
            assert err < 0.02, f"track {n} is off by {err:.4f} px"
            checked += vis.sum()
    assert checked > 0.5 * sum(c["visible"].size for c in clips)


def test_occlusion_flags_agree_with_depth(clips):
    _check_occlusion(clips)


def _check_occlusion(clips):
    agree_vis = agree_occ = n_vis = n_occ = 0
    for c in clips:
        H, Wd = c["depth"].shape[1:]
        for n in range(len(c["tracks"])):
            for k in range(len(c["depth"])):
                x, y = c["tracks"][n, k]
                if not (0 <= x < Wd and 0 <= y < H):
                    assert not c["visible"][n, k], "a point outside the frame cannot be visible"
                    continue
                # the depth map around the point: the 2x2 pixel centres that surround it
                i0, j0 = int(np.clip(y - 0.5, 0, H - 2)), int(np.clip(x - 0.5, 0, Wd - 2))
                near = c["depth"][k, i0:i0 + 2, j0:j0 + 2]
                d_pt = c["track_depth"][n, k]
                if c["visible"][n, k]:
                    n_vis += 1
                    agree_vis += near.min() * 0.995 <= d_pt <= near.max() * 1.005
                else:
                    n_occ += 1
                    agree_occ += near.min() < d_pt * 0.99
    # Points next to a silhouette edge see two surfaces around them; allow a few disagreements.
    assert n_vis > 1000 and agree_vis / n_vis > 0.98, (agree_vis, n_vis)
    assert n_occ > 50 and agree_occ / n_occ > 0.95, (agree_occ, n_occ)


def test_boxes_contain_the_objects_pixels_and_are_tight(clips):
    _check_boxes(clips)


def _check_boxes(clips):
    gaps = []
    for c in clips:
        for k in np.nonzero(c["object_present"])[0]:
            for t in range(len(c["mask"])):
                ii, jj = np.nonzero(c["mask"][t] == k + 1)
                if len(ii) == 0:
                    continue
                assert c["box_valid"][t, k]
                x0, y0, x1, y1 = c["boxes"][t, k]
                # every pixel centre that sees the object lies inside its projected box
                assert (jj + 0.5 >= x0 - 0.05).all() and (jj + 0.5 <= x1 + 0.05).all()
                assert (ii + 0.5 >= y0 - 0.05).all() and (ii + 0.5 <= y1 + 0.05).all()
                gaps.append(max(x0 - jj.min(), y0 - ii.min(), jj.max() + 1 - x1, ii.max() + 1 - y1, 0)
                            + max(jj.min() - x0, ii.min() - y0, x1 - jj.max() - 1, y1 - ii.max() - 1, 0))
    assert np.median(gaps) < 1.0  # boxes hug the pixels (occluders aside)


def _cam0(c, points):
    c2w = c["cam_to_world"][0].astype(np.float64)
    return (points - c2w[:3, 3]) @ c2w[:3, :3]


@pytest.mark.parametrize("motion", MOTION_ACTIONS)
def test_motion_label_matches_rendered_motion(motion):
    m = MOTION_ACTIONS.index(motion)
    c = render_clip(CFG, "val", _find("val", {"motion": m, "camera": 0}))
    centre = c["object_to_world"][:, 0, :3, 3].astype(np.float64)
    R = c["object_to_world"][:, 0, :3, :3].astype(np.float64)
    d = _cam0(c, centre[-1]) - _cam0(c, centre[0])  # displacement in the first camera's axes
    yaw = np.degrees(np.arctan2(R[-1, 1, 0], R[-1, 0, 0]) - np.arctan2(R[0, 1, 0], R[0, 0, 0]))
    yaw = (yaw + 180) % 360 - 180
    dz = centre[-1, 2] - centre[0, 2]
    # the camera is static, so the mask centroid moves the same way in the image
    ii0, jj0 = np.nonzero(c["mask"][0] == 1)
    ii1, jj1 = np.nonzero(c["mask"][-1] == 1)
    du = jj1.mean() - jj0.mean()
    expect = {
        "move_left": d[0] < -0.3 and du < -5, "move_right": d[0] > 0.3 and du > 5,
        "approach": d[2] < -0.7, "recede": d[2] > 0.7,
        "rise": dz > 0.25 and (ii1.mean() < ii0.mean()), "fall": dz < -0.25 and (ii1.mean() > ii0.mean()),
        "spin_clockwise": yaw < -60 and np.abs(d).max() < 1e-4,
        "spin_counterclockwise": yaw > 60 and np.abs(d).max() < 1e-4,
        "bounce": np.ptp(centre[:, 2]) > 0.4 and np.ptp(centre[:, :2], 0).max() < 1e-6,
        "still": np.ptp(centre, 0).max() < 1e-6 and abs(yaw) < 1e-3,
    }
    assert expect[motion], dict(d=d, yaw=yaw, dz=dz, du=du)


@pytest.mark.parametrize("camera", CAMERA_MOTIONS)
def test_camera_label_matches_camera_path(camera):
    cfg = WorldConfig(seed=3, frames=5, height=16, width=16, track_points=4, textures="procedural")
    c = render_clip(cfg, "test", _find("test", {"camera": CAMERA_MOTIONS.index(camera)}, cfg=cfg))
    c2w = c["cam_to_world"].astype(np.float64)
    move = _cam0(c, c2w[-1, :3, 3])  # last camera centre in the first camera's axes
    fwd = c2w[-1, :3, 2] @ c2w[0, :3, :3]  # last viewing direction in the first camera's axes
    turned = np.degrees(np.arccos(np.clip(fwd[2], -1, 1)))
    expect = {
        "static": np.abs(move).max() < 1e-5 and turned < 0.1,
        "pan_left": np.abs(move).max() < 1e-5 and fwd[0] < -0.08,
        "pan_right": np.abs(move).max() < 1e-5 and fwd[0] > 0.08,
        "orbit_left": move[0] < -0.8 and fwd[0] > 0.2,  # moves left, turning to keep the main object in view
        "orbit_right": move[0] > 0.8 and fwd[0] < -0.2,
        "dolly_in": move[2] > 0.6 and turned < 0.1 and abs(move[0]) < 1e-4,
        "dolly_out": move[2] < -0.6 and turned < 0.1 and abs(move[0]) < 1e-4,
    }
    assert expect[camera], dict(move=move, fwd=fwd, turned=turned)


def test_same_seed_same_clip_other_seed_other_clip():
    cfg = WorldConfig(seed=11, height=32, width=32, textures="procedural")
    a, b = render_clip(cfg, "train", 4), render_clip(cfg, "train", 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["video"], render_clip(cfg, "train", 5)["video"])
    other_seed = WorldConfig(seed=12, height=32, width=32, textures="procedural")
    assert not np.array_equal(a["video"], render_clip(other_seed, "train", 4)["video"])
    assert not np.array_equal(a["video"], render_clip(cfg, "val", 4)["video"])


def test_labels_are_balanced():
    n = 840  # a common multiple of the block sizes (12 object x activity pairs, 10 motions, 6 scenes, 7 cameras, 12 textures)
    labels = np.array([[sample_labels(CFG, "train", i)[k] for k in W.LABEL_NAMES] for i in range(n)])
    for k, (task, names) in enumerate(W.LABEL_NAMES.items()):
        counts = np.bincount(labels[:, k], minlength=len(names))
        assert counts.min() == counts.max() == n // len(names), (task, counts)
    # appearance is object x activity
    assert list(W.LABEL_NAMES)[:6] == ["object", "scene", "motion", "appearance", "camera", "texture"]
    np.testing.assert_array_equal(labels[:, 3] // len(W.ACTIVITIES), labels[:, 0])


def test_appearance_activity_matches_the_other_objects():
    """Busy: every other object glides or turns; calm: they all stand still."""
    cfg = WorldConfig(seed=3, frames=5, height=16, width=16, track_points=4, textures="procedural")
    for i in range(24):
        c = render_clip(cfg, "val", i)
        busy = W.ACTIVITIES[c["labels"][3] % 2] == "busy"
        others = np.nonzero(c["object_present"])[0][1:]
        assert len(others) >= 1
        for k in others:
            o2w = c["object_to_world"][:, k].astype(np.float64)
            moved = np.ptp(o2w[:, :3, 3], 0).max() + np.abs(o2w[-1, :3, 0] - o2w[0, :3, 0]).max()
            assert (moved > 0.3) if busy else (moved < 1e-5), (i, k, busy, moved)


def test_no_object_goes_below_the_ground_and_bounces_span_every_height():
    """Over many clips every object's lowest point stays on or above the ground (z = 0), and a bouncing
    object's height at any frame has the same range as every other object's (drawn from one law)."""
    cfg = WorldConfig(seed=5, frames=17, textures="procedural")
    lows, heights = [], {True: [], False: []}
    for i in range(3000):
        _, lab, eyes, _, _, objs, _, _ = W._sample_scene(cfg, "train", i)
        for ob in objs:
            lows.append((ob.pos[:, 2] - ob.half[2]).min())  # yaw-only rotations: the bottom is centre - half height
        bottom = (objs[0].pos[:, 2] - objs[0].half[2]) / np.linalg.norm(objs[0].pos - eyes, axis=1)
        if W.MOTION_ACTIONS[lab["motion"]] in ("bounce", "still", "spin_clockwise", "spin_counterclockwise"):
            heights[W.MOTION_ACTIONS[lab["motion"]] == "bounce"].append(bottom)
    assert min(lows) >= -1e-9
    b, o = np.array(heights[True]), np.array(heights[False])
    for t in (0, 8, 16):  # per-metre heights at a frame: the same quartiles whether bouncing or not
        np.testing.assert_allclose(np.percentile(b[:, t], [10, 50, 90]), np.percentile(o[:, t], [10, 50, 90]), atol=0.02)


def test_texture_label_is_the_main_objects_pattern_in_every_mode():
    """The main object wears its texture class's two-tone pattern; Fashion-MNIST images (when
    installed) replace only the other objects' textures."""
    modes = ["procedural"] + (["fashion"] if WorldConfig(textures="auto").resolved().textures == "fashion" else [])
    for i in range(12):
        scenes = {m: W._sample_scene(WorldConfig(seed=2, frames=1, height=16, width=16, textures=m), "train", i) for m in modes}
        lab, objs = scenes["procedural"][1], scenes["procedural"][5]
        tex = objs[0].texture
        tones = np.unique(tex.reshape(-1, 3), axis=0)
        assert len(tones) == 2
        w = (tex == tones[0]).all(-1)
        # the pattern's tone layout, up to the phase: compare the share of each tone with the class's
        share = W._pattern(W.TEXTURE_CLASSES[lab["texture"]], (0.0, 0.0)).mean()
        assert min(abs(w.mean() - share), abs(1 - w.mean() - share)) < 0.1, (i, lab["texture"], w.mean(), share)
        for m in modes[1:]:
            np.testing.assert_array_equal(scenes[m][5][0].texture, tex)


def test_fashion_textures_change_pixels_only():
    pytest.importorskip("h5py")
    if WorldConfig(textures="auto").resolved().textures != "fashion":
        pytest.skip("dataset-fashion-mnist not installed: apt-get install dataset-fashion-mnist")
    a = render_clip(WorldConfig(seed=2, height=32, width=32, textures="procedural"), "train", 0)
    b = render_clip(WorldConfig(seed=2, height=32, width=32, textures="fashion"), "train", 0)
    for key in ("depth", "mask", "tracks", "visible", "boxes", "labels", "cam_to_world"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    obj = a["mask"] > 0
    assert not np.array_equal(a["video"][obj], b["video"][obj])
    np.testing.assert_array_equal(a["video"][~obj & (a["depth"] > 30)], b["video"][~obj & (a["depth"] > 30)])


@pytest.mark.slow
def test_geometry_holds_over_many_clips():
    """The three geometry checks over 60 clips that cover every label (opt in: -m slow)."""
    cfg = WorldConfig(seed=8, textures="procedural")
    many = [render_clip(cfg, "test", i) for i in range(60)]
    _check_tracks(many)
    _check_occlusion(many)
    _check_boxes(many)
