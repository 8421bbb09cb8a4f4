"""Feature files as probe data: one feature (a timestep and block) of one split.

`load_split(path, key)` reads it into memory as the dict `probes.fit.fit` takes; `FeatureSplit`
streams it from the file instead, for files larger than memory (each DataLoader worker opens its
own handle). Both give the features, `frame_index`, every label (`labels/<task>`) and annotation
the file holds, `label_names` and `image_size` (H, W of the clips the model saw).
"""
from __future__ import annotations

import numpy as np

from walt.features.h5 import FeatureFile


def _meta(ff: FeatureFile) -> dict:
    return {"frame_index": np.asarray(ff.frame_index), "label_names": {t: ff.class_names(t) for t in ff.tasks},
            "image_size": tuple(int(v) for v in ff.attrs["video_size"][1:3])}


def load_split(path: str, key: str, expect: dict | None = None) -> dict:
    """Feature `key` ('t0200/b02', or 'latent') of every clip in `path`, with its labels and targets."""
    with FeatureFile(path, expect=expect) as ff:
        data = {"features": ff.features(key), **_meta(ff)}
        data.update({f"labels/{t}": ff.labels(t) for t in ff.tasks})
        data.update({name: ff.target(name) for name in ff.target_names})
    return data


class FeatureSplit:
    """The lazy form of `load_split`: rows are read when a batch asks for them."""

    def __init__(self, path: str, key: str, expect: dict | None = None):
        self.file = FeatureFile(path, expect=expect)
        self.key = key
        self.file.shape(key)  # a missing feature fails here, with the keys the file has
        for name, value in _meta(self.file).items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.file)

    def get_batch(self, idx) -> dict:
        idx = np.asarray(idx)
        out = {"features": self.file.features(self.key, idx)}
        out.update({f"labels/{t}": self.file.labels(t, idx) for t in self.file.tasks})
        out.update({name: self.file.target(name, idx) for name in self.file.target_names})
        return out
