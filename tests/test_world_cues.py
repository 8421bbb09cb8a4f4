"""What one frame of a world clip gives away, measured on the annotations `render_clip` returns.

For each label about change (motion, camera; and the temporal half of appearance) a small MLP
(tests/world_cues.py) reads the per-frame state of the main object, the camera and the other
objects. On one frame at any index it must stay below twice chance; on two frames (first and last,
in the first camera's axes) it must reach 90%. Annotation geometry does not depend on the image
size, so the clips are rendered at 16 x 16 with 17 frames. The numbers in docs/data.md come from
`python tests/test_world_cues.py`, which runs the full version (every frame index)."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if __name__ == "__main__":  # run as a script: this checkout's package, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import world_cues as wc  # noqa: E402

from walt.data.world import LABEL_NAMES, WorldConfig, render_clip  # noqa: E402

CLIPS = 1000
CFG = WorldConfig(seed=0, frames=17, height=16, width=16, track_points=4, textures="procedural")
TASKS = {"motion": wc.OBJECT, "camera": wc.MAIN, "appearance": wc.OTHERS}


def render_states():
    single, pair, labels = [], [], []
    for i in range(CLIPS):
        c = render_clip(CFG, "train", i)
        s, p = wc.single_and_pair(c)
        single.append(s)
        pair.append(p)
        labels.append(c["labels"])
    return np.array(single), np.array(pair), np.array(labels)


@pytest.fixture(scope="module")
def states():
    return render_states()


def measure(states, task, frames=None):
    """(single-frame accuracies at `frames` (default: all), two-frame accuracy, chance)."""
    torch.set_num_threads(1)
    single, pair, labels = states
    frames = range(single.shape[1]) if frames is None else frames
    y, n = labels[:, list(LABEL_NAMES).index(task)], len(LABEL_NAMES[task])
    one = wc.fit_accuracy(wc.part(single[:, list(frames)], TASKS[task]).transpose(1, 0, 2), y, n)
    two = wc.fit_accuracy(wc.part(pair, TASKS[task]), y, n)
    return one, two, 1 / n


@pytest.mark.parametrize("task", ["motion", "camera"])
def test_one_frame_says_little_two_frames_tell(states, task):
    """At the end frames, where a motion centred on the middle frame has moved furthest."""
    T = states[0].shape[1]
    one, two, chance = measure(states, task, frames=[0, T - 1])
    assert one.max() < 2 * chance, (task, one)
    assert two >= 0.9, (task, two)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["motion", "camera", "appearance"])
def test_one_frame_says_little_at_any_index(states, task):
    one, two, chance = measure(states, task)
    if task == "appearance":  # the shape shows in one frame (50% then), whether the others move does not
        assert one.max() < 0.6 and two >= 0.9, (one, two)
    else:
        assert one.max() < 2 * chance and two >= 0.9, (task, one, two)


def texture_accuracy(size, clips=1200):
    """4-fold accuracy of the MLP on the main object's pixels (crop + spectrum) in one frame."""
    torch.set_num_threads(1)
    cfg = WorldConfig(seed=0, frames=1, height=size, width=size, track_points=4, textures="procedural")
    crops, y = [], []
    for i in range(clips):
        c = render_clip(cfg, "train", i)
        crops.append(wc.texture_crops(c))
        y.append(c["labels"][list(LABEL_NAMES).index("texture")])
    return wc.fit_accuracy(wc.texture_features(np.array(crops)), np.array(y), len(LABEL_NAMES["texture"]))


@pytest.mark.slow
def test_texture_classes_are_told_apart_in_one_frame():
    """A fine-grained task: a crude reader (MLP on a 16 x 16 crop and its spectrum) gets well above
    chance (1/12) from one frame, more so at 64 px than at 32 px."""
    a64, a32 = texture_accuracy(64), texture_accuracy(32)
    assert a64 > 0.45 and a32 > 0.25 and a64 > a32 + 0.1, (a64, a32)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    st = render_states()
    print(f"rendered {CLIPS} clips in {time.perf_counter() - t0:.1f} s")
    for task in TASKS:
        one, two, chance = measure(st, task)
        print(f"{task}: chance {chance:.3f}; one frame max {one.max():.3f} (per index {np.round(one, 2).tolist()}); "
              f"two frames {two:.3f}", flush=True)
        lin_one, lin_two = (wc.fit_accuracy(wc.part(st[0], TASKS[task]).transpose(1, 0, 2), st[2][:, list(LABEL_NAMES).index(task)],
                                            len(LABEL_NAMES[task]), hidden=0).max(),
                            wc.fit_accuracy(wc.part(st[1], TASKS[task]), st[2][:, list(LABEL_NAMES).index(task)],
                                            len(LABEL_NAMES[task]), hidden=0))
        print(f"  logistic regression: one frame max {lin_one:.3f}, two frames {lin_two:.3f}", flush=True)
    for size in (64, 32):
        print(f"texture at {size} px: chance {1 / 12:.3f}; one frame {texture_accuracy(size):.3f}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")
