"""Data for walt: a procedural 3D world with exact ground truth for every probe task
(`world`), its HDF5 store (`store`), readers for real datasets' formats (`readers`), and the
dataset protocol with its transforms (`dataset`, `transforms`). See docs/data.md."""
from walt.data.dataset import ClipDataset, FrameDataset, build_dataset, clip_of
from walt.data.store import WorldStore, generate
from walt.data.world import LABEL_NAMES, WorldConfig, render_clip

__all__ = ["ClipDataset", "FrameDataset", "build_dataset", "clip_of", "WorldStore", "generate", "LABEL_NAMES", "WorldConfig", "render_clip"]
