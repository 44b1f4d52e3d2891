"""build_map: what lands on disk, the items and errors it accepts, and what a failure leaves behind."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import picomap as pm
from conftest import listing, oracle_hash, read_json, snapshot, tokens

MAP_FILES = ["toy.dat", "toy.json", "toy.starts.npy"]


def read_back(path):
    load, n = pm.get_loader_fn(path)
    return [load(i) for i in range(n)]


def assert_same_items(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes(order="C")


# ---------------------------------------------------------------- what lands on disk

def test_writes_exactly_three_files_and_returns_the_json(in_tmp):
    items = tokens()
    header = pm.build_map(items, "toy", progress=False, meta={"split": "train", "n": [1, 2]})
    assert listing(in_tmp) == MAP_FILES
    assert header == read_json("toy")
    assert header["meta"] == {"split": "train", "n": [1, 2]}
    assert header["count"] == len(items) and header["total_rows"] == sum(map(len, items))
    assert header["dtype"] == "int32" and header["trail_dim"] == [] and header["format_version"] == 1
    starts = np.load("toy.starts.npy")
    assert starts.dtype == np.uint64 and starts.tolist() == np.cumsum([0] + [len(a) for a in items]).tolist()
    assert Path("toy.dat").read_bytes() == b"".join(a.tobytes() for a in items)


def test_hash_matches_an_independent_oracle_whatever_the_batch_size(in_tmp, monkeypatch):
    items = [np.random.default_rng(i).standard_normal((i % 7, 3, 2)) for i in range(200)]
    want = oracle_hash(items)
    for batch_bytes in (1, 100, 1 << 20):
        monkeypatch.setattr(pm, "BATCH_BYTES", batch_bytes)
        assert pm.build_map(items, f"m{batch_bytes}", progress=False)["hash"] == want


@pytest.mark.parametrize("given, folder, stem", [
    ("toy", ".", "toy"), ("toy.dat", ".", "toy"), (Path("toy"), ".", "toy"), (Path("toy.dat"), ".", "toy"),
    ("data/v1.2/train.v2", "data/v1.2", "train.v2"), ("deep/er/x.dat", "deep/er", "x"),
])
def test_path_forms(in_tmp, given, folder, stem):
    items = tokens(5)
    pm.build_map(items, given, progress=False)
    assert listing(in_tmp / folder) == [f"{stem}.dat", f"{stem}.json", f"{stem}.starts.npy"]
    for other in (given, os.path.join(folder, stem), Path(folder) / f"{stem}.dat"):
        assert_same_items(read_back(other), items)
        assert pm.verify_hash(other, progress=False) is True


@pytest.mark.parametrize("bad", ["", ".dat", "folder/", b"toy"])
def test_paths_that_name_no_map_are_refused(in_tmp, bad):
    with pytest.raises((ValueError, TypeError)):
        pm.build_map(tokens(2), bad, progress=False)
    assert listing(in_tmp) == []


def test_progress_bar_shows_by_default_and_not_when_disabled(in_tmp, capsys):
    pm.build_map(tokens(3), "a")
    assert "build a.dat" in capsys.readouterr().err
    pm.build_map(tokens(3), "b", progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the items it takes

def test_array_likes_lists_and_any_memory_layout_are_stored_in_c_order(in_tmp):
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    items = [[[1.0, 2.0], [3.0, 4.0]], np.asfortranarray(base[:, :2]), base[::2, 3:5], base[:0, :2]]
    pm.build_map(items, "toy", progress=False)
    assert_same_items(read_back("toy"), [np.asarray(items[0]), *items[1:]])
    assert read_json("toy")["hash"] == oracle_hash(items)


def test_torch_cpu_tensors(in_tmp):
    torch = pytest.importorskip("torch")
    items = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) for n in (3, 0, 5)]
    pm.build_map(items, "toy", progress=False)
    assert_same_items(read_back("toy"), [t.numpy() for t in items])


def test_byte_order_and_exotic_dtypes_are_kept(in_tmp):
    for name, dtype in [("be", ">i4"), ("dt", "datetime64[ns]"), ("u", "<U3"),
                        ("rec", [("a", "<i2"), ("b", ">f8", (2,))])]:
        items = [np.zeros((n, 2), dtype) for n in (1, 0, 3)]
        items[0].view(np.uint8)[:] = 7
        pm.build_map(items, name, progress=False)
        load, _ = pm.get_loader_fn(name)
        assert load.dtype == np.dtype(dtype)
        assert_same_items(list(load), items)
        assert pm.verify_hash(name, progress=False)
        assert read_json(name)["hash"] == oracle_hash(items)


def test_empty_iterable_writes_a_valid_empty_map(in_tmp):
    header = pm.build_map(iter([]), "toy", progress=False)
    assert listing(in_tmp) == MAP_FILES
    assert header["count"] == 0 and header["total_rows"] == 0
    assert header["hash"] == oracle_hash([])
    assert pm.verify_hash("toy", progress=False)
    load, n = pm.get_loader_fn("toy")
    assert n == 0 and len(load) == 0 and list(load) == []
    with pytest.raises(IndexError):
        load(0)


def test_items_with_zero_rows(in_tmp):
    items = [np.zeros((0, 3), np.int16), np.ones((2, 3), np.int16), np.zeros((0, 3), np.int16)]
    pm.build_map(items, "toy", progress=False)
    assert_same_items(read_back("toy"), items)
    assert pm.verify_hash("toy", progress=False)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["<i4", ">i4", "<f8", ">f4", "|b1", "|u1", "<u2", "<c8", "|S3", "<M8[s]"]),
       trail=st.lists(st.integers(0, 3), max_size=2),
       lengths=st.lists(st.integers(0, 6), max_size=8),
       layout=st.sampled_from(["C", "F", "strided"]),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_property(tmp_path_factory, dtype, trail, lengths, layout, seed):
    rng = np.random.default_rng(seed)
    items = []
    for n in lengths:
        shape = (n, *trail)
        raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize * 2, dtype=np.uint8)
        big = raw.view(dtype).reshape(2 * n, *trail)
        item = {"C": big[:n], "F": np.asfortranarray(big[:n]), "strided": big[::2]}[layout]
        items.append(item)
    path = tmp_path_factory.mktemp("prop") / "m"
    header = pm.build_map(items, path, progress=False)
    assert header["hash"] == oracle_hash(items)
    assert_same_items(read_back(path), items)
    assert pm.verify_hash(path, progress=False)


# ---------------------------------------------------------------- bad items: a clear error, nothing on disk

@pytest.mark.parametrize("items, error, words", [
    ([np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float64)], ValueError, ["item 1", "<f4", "<f8"]),
    ([np.zeros((2, 3)), np.zeros((2, 4))], ValueError, ["item 1", "(3,)", "(4,)"]),
    ([np.zeros((2, 3)), np.zeros(2)], ValueError, ["item 1", "(3,)", "()"]),
    ([np.zeros(3), np.zeros(2), np.float64(1.0)], ValueError, ["item 2", "0-d"]),
    ([np.float64(1.0)], ValueError, ["item 0", "0-d"]),
    ([np.zeros(2, ">i4"), np.zeros(2, "<i4")], ValueError, ["item 1", ">i4", "<i4"]),
    ([np.array([1, "a"], dtype=object)], TypeError, ["item 0", "object"]),
    ([np.zeros(2, [("a", "i4"), ("b", "O")])], TypeError, ["item 0", "object"]),
])
def test_bad_item_raises_naming_it_and_writes_nothing(in_tmp, items, error, words):
    with pytest.raises(error) as caught:
        pm.build_map(items, "toy", progress=False)
    for word in words:
        assert word in str(caught.value)
    assert listing(in_tmp) == []


@pytest.mark.parametrize("meta", [[1, 2], {"f": object()}, {1j: 1}, {"x": float("nan")}])
def test_meta_must_be_a_json_object(in_tmp, meta):
    with pytest.raises((TypeError, ValueError), match="meta"):
        pm.build_map(tokens(3), "toy", progress=False, meta=meta)
    assert listing(in_tmp) == []


# ---------------------------------------------------------------- failures leave the old map exactly as it was

def failing_items(exc):
    yield from tokens(10, seed=2)
    raise exc


def assert_old_map_intact(old_map, folder):
    items, files = old_map
    assert snapshot("toy") == files
    assert listing(folder) == MAP_FILES  # no temporary file survives
    assert pm.verify_hash("toy", progress=False)
    assert_same_items(read_back("toy"), items)


@pytest.mark.parametrize("exc", [RuntimeError("source broke"), KeyboardInterrupt()])
def test_failing_iterable_leaves_previous_map(old_map, in_tmp, exc):
    with pytest.raises(type(exc)):
        pm.build_map(failing_items(exc), "toy", progress=False)
    assert_old_map_intact(old_map, in_tmp)


def test_bad_item_midway_leaves_previous_map(old_map, in_tmp, monkeypatch):
    monkeypatch.setattr(pm, "BATCH_BYTES", 64)  # several batches already written when it fails
    with pytest.raises(ValueError, match="item 10"):
        pm.build_map([*tokens(10, seed=2), np.zeros(3, np.float32)], "toy", progress=False)
    assert_old_map_intact(old_map, in_tmp)


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""
    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        self.room -= memoryview(data).nbytes
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.mark.parametrize("target", ["write-data", "write-starts", "fsync", "replace"])
def test_disk_errors_while_writing_or_committing_leave_previous_map(old_map, in_tmp, monkeypatch, target):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def opener(path, mode="r", *args, **kwargs):  # picomap's new files fill up the disk
        handle = open(path, mode, *args, **kwargs)
        room = 100 if target == "write-data" else 0
        temporary = path.name.endswith(".tmp") and "w" in mode
        return FullDisk(handle, room) if temporary and (target == "write-data") == path.name.startswith(".toy.dat") else handle

    with monkeypatch.context() as patch, pytest.raises(OSError) as caught:
        patch.setattr(pm, "BATCH_BYTES", 64)
        if target.startswith("write"):
            patch.setattr(pm, "open", opener, raising=False)
        else:
            patch.setattr(pm.os, target, no_space)
        pm.build_map(tokens(10, seed=2), "toy", progress=False)
    assert caught.value.errno == errno.ENOSPC
    assert_old_map_intact(old_map, in_tmp)


def test_a_new_build_replaces_the_old_map_whole(old_map, in_tmp):
    new = [np.arange(n, dtype=np.int32) for n in (4, 5)]
    pm.build_map(new, "toy", progress=False)
    assert listing(in_tmp) == MAP_FILES
    assert_same_items(read_back("toy"), new)
    assert read_json("toy")["hash"] == oracle_hash(new)
