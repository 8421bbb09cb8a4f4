"""The feature file: a killed dump resumes to the file an uninterrupted one writes, 2 ranks write
what 1 process writes, and the reader refuses incomplete, truncated and mismatched files."""
import os
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import run_python, run_with_file_size_limit
from walt.data.store import WorldStore
from walt.features import (
    FeatureFile,
    FeatureFileError,
    FeatureWriteError,
    FeatureWriter,
)
from walt.features.dump import PreparedClips, dump, load_backbone
from walt.features.extract import Backbone
from walt.features.h5 import feature_chunks, shard_path

pytestmark = pytest.mark.usefixtures("one_thread")


def setup_dump(tiny, run="video", blocks=(0, 1), t=(0, 200)):
    backbone, attrs, size = load_backbone(tiny[run] if ":" not in run else run.split(":")[0] + ":" + tiny[run.split(":")[1]],
                                          list(blocks), list(t))
    clips = PreparedClips(WorldStore(tiny["world"], "test"), size)
    attrs.update(data=tiny["world"], data_format="world", split="test")
    return backbone, attrs, clips


def contents(path):
    """Every dataset of a feature file (read through virtual datasets where joined)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def assert_same_contents(a, b):
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        assert ca[k].dtype == cb[k].dtype and ca[k].shape == cb[k].shape, k
        assert np.array_equal(ca[k], cb[k], equal_nan=ca[k].dtype.kind == "f"), k


def test_a_killed_dump_resumes_to_the_uninterrupted_file(tiny, tmp_path, monkeypatch):
    backbone, attrs, clips = setup_dump(tiny)
    dump(str(tmp_path / "full.h5"), backbone, clips, attrs, batch_size=2)
    real, calls = Backbone.clip_features, []

    def dies_after_3(self, video, clip_id):
        calls.append(clip_id)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while computing clip 3 (batch [2, 3])
        return real(self, video, clip_id)

    monkeypatch.setattr(Backbone, "clip_features", dies_after_3)
    part = str(tmp_path / "part.h5")
    with pytest.raises(KeyboardInterrupt):
        dump(part, backbone, clips, attrs, batch_size=2)
    with pytest.raises(FeatureFileError, match=r"part.h5: 2 of 6 clips done; rerun the dump to finish it"):
        FeatureFile(part)
    monkeypatch.setattr(Backbone, "clip_features", real)
    calls.clear()
    monkeypatch.setattr(Backbone, "clip_features", lambda self, v, i: calls.append(i) or real(self, v, i))
    dump(part, backbone, clips, attrs, batch_size=4)  # another batch size: the same file
    assert calls == [2, 3, 4, 5]  # continued at the first clip not done
    assert_same_contents(tmp_path / "full.h5", part)
    ff = FeatureFile(part)
    assert ff.done.all() and ff.clip_index.tolist() == list(range(6))


def test_a_file_for_another_dump_is_refused_naming_the_attribute(tiny, tmp_path):
    backbone, attrs, clips = setup_dump(tiny, blocks=(1,), t=(200,))
    out = str(tmp_path / "f.h5")
    dump(out, backbone, clips, attrs)
    other, attrs2, _ = setup_dump(tiny, blocks=(1,), t=(100,))
    with pytest.raises(FeatureFileError, match=r"f.h5 was written with a different timesteps \(\[200\], now \[100\]\)"):
        dump(out, other, clips, attrs2)
    other, attrs2, _ = setup_dump(tiny, run="random:video", blocks=(1,), t=(200,))
    with pytest.raises(FeatureFileError, match=r"different checkpoint_sha256|different kind"):
        dump(out, other, clips, attrs2)
    with pytest.raises(FeatureFileError, match=r"f.h5 has blocks=\[1\], expected \[0\]"):
        FeatureFile(out, expect={"blocks": [0]})
    with pytest.raises(FeatureFileError, match=r"f.h5 has checkpoint_sha256='[0-9a-f]{6}.*expected 'abc'"):
        FeatureFile(out, expect={"checkpoint_sha256": "abc"})
    # a different config (same weights file): the run's config is compared as a whole
    with pytest.raises(FeatureFileError, match=r"different config"):
        dump(out, backbone, clips, {**attrs, "config": attrs["config"].replace('"depth": 2', '"depth": 3')})


def test_truncated_and_foreign_files_are_refused(tiny, tmp_path):
    backbone, attrs, clips = setup_dump(tiny, blocks=(1,), t=(200,))
    out = tmp_path / "f.h5"
    dump(str(out), backbone, clips, attrs)
    data = out.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match=r"cut.h5 is truncated or corrupt"):
        FeatureFile(tmp_path / "cut.h5")
    with pytest.raises(FeatureFileError, match=r"cut.h5 is truncated or corrupt .*; delete it and rerun the dump"):
        dump(str(tmp_path / "cut.h5"), backbone, clips, attrs)
    (tmp_path / "junk.h5").write_bytes(b"\0" * 1000)
    with pytest.raises(FeatureFileError, match=r"junk.h5 is truncated or corrupt"):
        FeatureFile(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something/2"
    with pytest.raises(FeatureFileError, match=r"other.h5 is not a walt-features/1 feature file"):
        FeatureFile(tmp_path / "other.h5")
    with pytest.raises(FeatureFileError, match="does not exist"):
        FeatureFile(tmp_path / "missing.h5")


def test_a_full_disk_ends_in_one_sentence_naming_the_path_and_the_dump_resumes(tiny, tmp_path):
    args = ["dump", "--run", tiny["video"], "--data", tiny["world"], "--blocks", "1", "--t", "200", "--batch-size", "2",
            "--device", "cpu", "--out"]
    full = str(tmp_path / "full.h5")
    assert run_with_file_size_limit(tmp_path, 1 << 40, "probe", args + [full]).returncode == 0
    out = str(tmp_path / "f.h5")
    res = run_with_file_size_limit(tmp_path, int(os.path.getsize(full) * 0.9), "probe", args + [out])
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"Error: cannot write features to {re.escape(out)} \(file write failed: File too large\); "
                        r"free space or choose another --out, then rerun to resume\.", last), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr
    done = FeatureFile(out, require_complete=False).done
    assert 0 < done.sum() < len(done)  # what was flushed stays done
    assert run_with_file_size_limit(tmp_path, 1 << 40, "probe", args + [out]).returncode == 0  # space again: resumes
    assert_same_contents(full, out)


def test_reader_reads_any_index_order_and_survives_pickling(tiny, tmp_path):
    backbone, attrs, clips = setup_dump(tiny, blocks=(1,), t=(200,))
    out = str(tmp_path / "f.h5")
    dump(out, backbone, clips, attrs)
    ff = FeatureFile(out)
    allf = ff.features("t0200/b01")
    idx = [4, 0, 4, 2]
    assert np.array_equal(ff.features((200, 1), idx), allf[idx])
    assert np.array_equal(ff.target("depth", idx), ff.target("depth")[idx])
    assert ff.features("t0200/b01", []).shape == (0, 2, 4, 4, 32)
    with pytest.raises(IndexError, match="out of range for 6 clips"):
        ff.features("t0200/b01", [6])
    with pytest.raises(FeatureFileError, match=r"no features 't0000/b01'; it has \['t0200/b01'\]"):
        ff.features("t0000/b01")
    with pytest.raises(FeatureFileError, match=r"no 'pose' labels"):
        ff.labels("pose")
    clone = pickle.loads(pickle.dumps(ff))
    assert np.array_equal(clone.features("t0200/b01", [1]), allf[[1]])
    loader = torch.utils.data.DataLoader(_Rows(ff), batch_size=3, num_workers=2)  # forked workers reopen the file
    assert np.array_equal(torch.cat(list(loader)).numpy(), allf)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ff):
        self.ff = ff

    def __len__(self):
        return len(self.ff)

    def __getitem__(self, i):
        return torch.from_numpy(self.ff.features("t0200/b01", [i])[0])


def test_writer_chunks_and_pads_variable_annotations(tmp_path):
    assert feature_chunks((5, 16, 16, 1024)) == (1, 2, 16, 16, 1024)  # 512 KiB a frame: two fit in 1 MiB
    assert feature_chunks((5, 16, 16, 2048)) == (1, 1, 16, 16, 2048)
    assert feature_chunks((5, 32, 32, 2048)) == (1, 1, 8, 32, 2048)  # a 4 MiB frame: 1 MiB of its rows
    assert feature_chunks((5, 4, 4, 32)) == (1, 5, 4, 4, 32)
    path = str(tmp_path / "w.h5")
    attrs = {"num_clips": 3, "first_clip": 10, "kind": "walt"}
    with FeatureWriter(path, attrs, feature_shapes={"t0000/b00": (2, 1, 1, 4)}, frame_index=[0, 4],
                       label_names={"cls": ("a", "b")}) as w:
        f16 = {"t0000/b00": np.ones((1, 2, 1, 1, 4), np.float16)}
        w.put([0], f16, labels={"cls": [1]}, targets=[{"tracks": np.ones((2, 3), np.float32), "visible": np.ones((2,), bool)}])
        w.put([2], f16, labels={"cls": [0]}, targets=[{"tracks": np.full((4, 3), 2, np.float32),
                                                       "visible": np.ones((4,), bool)}])
    with pytest.raises(FeatureFileError, match="2 of 3 clips done"):
        FeatureFile(path)
    ff = FeatureFile(path, require_complete=False)
    tracks, visible = ff.target("tracks"), ff.target("visible")
    assert tracks.shape == (3, 4, 3) and np.isnan(tracks[0, 2:]).all() and np.isnan(tracks[1]).all()
    assert (tracks[2] == 2).all() and visible.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert ff.labels("cls").tolist() == [1, -1, 0] and ff.class_names("cls") == ("a", "b")
    assert ff.clip_index.tolist() == [10, 11, 12]
    with h5py.File(path) as f:
        assert f["features/t0000/b00"].compression is None  # float16 activations do not compress
        assert f["targets/tracks"].chunks == (1, 2, 3)  # one clip a chunk, as its first clip was


def test_small_batches_travel_in_groups_of_a_quarter_of_the_file_and_land_as_put(tmp_path, monkeypatch):
    sent = []
    real = FeatureWriter._send_group
    monkeypatch.setattr(FeatureWriter, "_send_group", lambda self: sent.append(len(self._group)) or real(self))
    path = str(tmp_path / "g.h5")
    with FeatureWriter(path, {"num_clips": 8, "first_clip": 0}, feature_shapes={"t0000/b00": (1, 1, 1, 4)},
                       frame_index=[0], label_names={"cls": ("a", "b")}) as w:
        for i in range(8):
            labels = {} if i == 5 else {"cls": [i % 2]}  # a batch without labels is written on its own
            w.put([i], {"t0000/b00": np.full((1, 1, 1, 1, 4), i, np.float16)}, labels=labels,
                  targets=[{"depth": np.full((2, 2), i, np.float32)}])
    assert sent == [2, 2, 2, 2, 0]  # a quarter of 8 clips a group; nothing left at close
    ff = FeatureFile(path)
    assert ff.features("t0000/b00")[:, 0, 0, 0, 0].tolist() == list(range(8))
    assert ff.labels("cls").tolist() == [0, 1, 0, 1, 0, -1, 0, 1]
    assert ff.target("depth")[:, 1, 1].tolist() == list(range(8))


def write_two_batches(path, **kw):
    w = FeatureWriter(path, {"num_clips": 4, "first_clip": 0}, feature_shapes={"t0000/b00": (1, 1, 1, 4)},
                      frame_index=[0], **kw)
    w.put([0, 1], {"t0000/b00": np.ones((2, 1, 1, 1, 4), np.float16)})
    return w


def test_a_writing_process_that_dies_ends_in_one_sentence_and_the_file_resumes(tmp_path):
    path = str(tmp_path / "w.h5")
    w = write_two_batches(path, queue_size=1)
    w.put([2], {"t0000/b00": np.ones((1, 1, 1, 1, 4), np.float16)})  # waits for [0, 1] to be done
    w._worker.kill()
    w._worker.wait()
    with pytest.raises(FeatureWriteError, match=r"the process writing .*w.h5 ended unexpectedly \(exit code -9\); rerun"):
        for _ in range(3):
            w.put([3], {"t0000/b00": np.ones((1, 1, 1, 1, 4), np.float16)})
    w.abort()
    # the file is intact: what it marks done is written, the rest is written on resuming
    w = FeatureWriter(path, {"num_clips": 4, "first_clip": 0}, feature_shapes={}, frame_index=[0])
    todo = w.todo()
    assert set(todo) >= {3}
    w.put(todo, {"t0000/b00": np.full((len(todo), 1, 1, 1, 4), 2, np.float16)})
    w.close()
    ff = FeatureFile(path)
    assert ff.features("t0000/b00")[:, 0, 0, 0, 0].tolist() == [2.0 if i in todo else 1.0 for i in range(4)]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_ranks_write_what_one_process_writes(tiny, tmp_path):
    backbone, attrs, clips = setup_dump(tiny)
    one = str(tmp_path / "one.h5")
    dump(one, backbone, clips, {**attrs, "data": os.path.abspath(tiny["world"])}, batch_size=2)
    two = str(tmp_path / "two" / "feats.h5")
    res = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "walt.cli.probe",
                     "--", "dump", "--run", tiny["video"], "--data", tiny["world"], "--blocks", "0,1", "--t", "0,200",
                     "--out", two, "--batch-size", "2", "--device", "cpu", OMP_NUM_THREADS="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert os.path.exists(shard_path(two, 0, 2)) and os.path.exists(shard_path(two, 1, 2))
    assert_same_contents(one, two)
    ff = FeatureFile(two)
    assert ff.attrs["shards"] == ["feats.h5.rank0-of-2.h5", "feats.h5.rank1-of-2.h5"]
    a, b = FeatureFile(one).attrs, ff.attrs
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= {"shards", "git_sha", "torch_threads"}
    # the joined file moves with its shards, and refuses to be read without them
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "two", moved)
    assert np.array_equal(FeatureFile(moved / "feats.h5").features("t0200/b01"), ff.features("t0200/b01"))
    os.remove(moved / "feats.h5.rank1-of-2.h5")
    with pytest.raises(FeatureFileError, match=r"joins shard .*feats.h5.rank1-of-2.h5, which is missing"):
        FeatureFile(moved / "feats.h5")
    # a completed sharded dump rerun with one process is recognised as complete, not rewritten
    assert dump(two, backbone, clips, {**attrs, "data": os.path.abspath(tiny["world"])}) == two
