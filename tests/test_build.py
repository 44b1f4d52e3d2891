"""build_map: what lands on disk, the items and errors it accepts, and what a failure leaves behind."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import picomap as pm
from conftest import listing, oracle_hash, read_json, snapshot, tokens, traced_peak

MAP_FILES = ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]


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
    assert listing(in_tmp / folder) == [f"{stem}.dat", f"{stem}.digests", f"{stem}.json", f"{stem}.starts.npy"]
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
    assert "build a: 3 items" in capsys.readouterr().err
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


# ---------------------------------------------------------------- every item as it was yielded, whatever the source

def refilled_buffer(lengths, dtype=np.int32, size=1024):
    """A chunked reader's pattern: one buffer refilled for every item, each item a view of it."""
    buf = np.empty(size, dtype)
    for k, n in enumerate(lengths):
        buf[:n] = k
        yield buf[:n]


@pytest.mark.parametrize("batch_bytes", [1, 64, 1 << 20])
def test_a_refilled_buffer_is_stored_as_each_item_was_yielded(in_tmp, monkeypatch, batch_bytes):
    monkeypatch.setattr(pm, "BATCH_BYTES", batch_bytes)
    lengths = [3, 5, 2, 0, 7, 300]
    header = pm.build_map(refilled_buffer(lengths), "toy", progress=False)
    want = [np.full(n, k, np.int32) for k, n in enumerate(lengths)]
    assert_same_items(read_back("toy"), want)
    assert header["hash"] == oracle_hash(want)


def test_items_larger_than_a_batch_are_written_before_the_next_is_made(in_tmp, monkeypatch):
    monkeypatch.setattr(pm, "BATCH_BYTES", 16)
    pm.build_map(refilled_buffer([100, 3, 100], size=100), "toy", progress=False)
    assert_same_items(read_back("toy"), [np.full(n, k, np.int32) for k, n in enumerate([100, 3, 100])])


def test_an_empty_list_is_an_empty_item_of_the_maps_dtype(in_tmp):
    pm.build_map([[1, 2], [], np.zeros((0,), np.int64)], "toy", progress=False)
    pm.build_map([[], [], [[1, 2]], []], "lead", progress=False)  # before any item fixes the dtype
    pm.build_map([[], ()], "only", progress=False)
    assert_same_items(read_back("toy"), [np.array([1, 2]), np.zeros(0, np.int64), np.zeros(0, np.int64)])
    assert_same_items(read_back("lead"), [np.zeros((0, 2), np.int64)] * 2 + [np.array([[1, 2]]),
                                          np.zeros((0, 2), np.int64)])
    assert_same_items(read_back("only"), [np.zeros(0)] * 2)
    for name in ("toy", "lead", "only"):
        assert pm.verify_hash(name, progress=False)


def test_an_empty_array_still_has_its_own_dtype(in_tmp):
    with pytest.raises(ValueError, match="item 1: dtype <f8 but the map is <i8"):
        pm.build_map([np.array([1, 2]), np.zeros(0)], "toy", progress=False)


def test_every_item_error_names_the_item(in_tmp):
    with pytest.raises(ValueError, match="item 2: not an array"):
        pm.build_map([[1], [2], [[1], [2, 3]]], "toy", progress=False)
    with pytest.raises(TypeError, match="item 3: dtype object holds Python objects"):
        pm.build_map([[1], [2], [3], np.array([None])], "toy", progress=False)
    assert listing(in_tmp) == []


@pytest.mark.parametrize("dtype, words", [
    (np.dtype([(("title", "a"), "<i4")]), "titled"),
    (np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i4"], "offsets": [4, 0]}), "out-of-order"),
    (np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [0, 0]}), "overlapping"),
])
def test_dtypes_a_json_cannot_record_are_refused_at_item_0(in_tmp, dtype, words):
    consumed = []

    def items():
        for k in range(5):
            consumed.append(k)
            yield np.zeros(2, dtype)
    with pytest.raises(ValueError, match=f"item 0: dtype .* cannot be recorded in a map's json .*{words}"):
        pm.build_map(items(), "toy", progress=False)
    assert consumed == [0] and listing(in_tmp) == []


def test_structured_and_padded_dtypes_round_trip(in_tmp):
    for k, dtype in enumerate([np.dtype([("label", "<i4"), ("score", "<f4")]),
                               np.dtype([("a", "u1"), ("b", "<i4")], align=True),
                               np.dtype([("a", [("x", "<i2"), ("y", "u1")]), ("b", ">f8", (2,))]),
                               np.dtype([])]):  # no fields, no bytes: still a dtype the json records
        items = [np.frombuffer(np.random.default_rng(k).bytes(dtype.itemsize * n), dtype) if dtype.itemsize
                 else np.zeros(n, dtype) for n in (3, 0, 2)]
        pm.build_map(items, f"m{k}", progress=False)
        load, _ = pm.get_loader_fn(f"m{k}")
        assert load.dtype == dtype
        assert_same_items(list(load), items)
        assert pm.verify_hash(f"m{k}", progress=False)


def test_a_meta_too_large_for_the_json_is_refused_before_writing(in_tmp, monkeypatch):
    monkeypatch.setattr(pm, "MAX_META_BYTES", 1000)
    consumed = []

    def items():
        consumed.append(1)
        yield np.zeros(1)
    with pytest.raises(ValueError, match=r"toy\.json: meta takes 1[0-9]{3} bytes of JSON, more than"):
        pm.build_map(items(), "toy", progress=False, meta={"tokenizer": "x" * 1000})
    assert consumed == [] and listing(in_tmp) == []
    assert pm.MAX_META_BYTES < pm.MAX_JSON_BYTES  # what is accepted, the loader opens


# ---------------------------------------------------------------- torch tensors, ml_dtypes

def test_torch_tensors_of_every_storable_dtype(in_tmp):
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for name in ("float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "bool", "complex64", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                 "float8_e4m3fnuz", "float8_e5m2fnuz"):
        dtype = getattr(torch, name)
        source = torch.arange(-4, 8, dtype=torch.float32).reshape(6, 2)
        items = [source[:n].to(dtype) for n in (6, 0, 3)]
        items[0].requires_grad_(dtype.is_floating_point or dtype.is_complex)
        pm.build_map(items, name, progress=False)
        load, n = pm.get_loader_fn(name)
        numpy_name = {"bool": "bool_"}.get(name, name)
        want_dtype = np.dtype(getattr(np, numpy_name, None) or getattr(ml_dtypes, name))
        assert n == 3 and load.dtype == want_dtype
        for got, tensor in zip(load, items):  # the same bytes as torch holds
            assert got.shape == tuple(tensor.shape)
            assert got.tobytes() == tensor.detach().view(torch.uint8).numpy().tobytes()
        assert pm.verify_hash(name, progress=False)


def test_torch_dtypes_numpy_cannot_hold_are_refused_naming_the_item(in_tmp):
    torch = pytest.importorskip("torch")
    items = [torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float4_e2m1fn_x2)]
    with pytest.raises(TypeError, match="item 1: torch.float4_e2m1fn_x2 has no numpy dtype"):
        pm.build_map(items, "toy", progress=False)
    assert listing(in_tmp) == []


# ---------------------------------------------------------------- bounded memory, whatever the items

@pytest.mark.parametrize("make", [lambda k: np.zeros(0, np.int8), lambda k: np.full(1, k % 100, np.int8)])
def test_build_memory_is_one_batch_whatever_the_count(in_tmp, make):
    peaks = [traced_peak(lambda: pm.build_map((make(k) for k in range(n)), f"m{n}", progress=False))
             for n in (100_000, 400_000)]
    assert peaks[1] < 16 << 20  # one batch of 1 MiB or 65,536 items (before: 85 MB, 213 bytes an item)
    assert peaks[1] < peaks[0] + (1 << 20)  # and not growing with the count
    assert pm.get_loader_fn("m400000")[1] == 400_000 and pm.verify_hash("m400000", progress=False)


def test_streamed_offsets_are_byte_for_byte_what_np_save_writes(in_tmp):
    import io
    for n in (0, 1, 12_345):
        pm.build_map((np.zeros(k % 3, np.uint8) for k in range(n)), f"m{n}", progress=False)
        written = Path(f"m{n}.starts.npy").read_bytes()
        saved = io.BytesIO()
        np.save(saved, np.load(f"m{n}.starts.npy"))
        assert written == saved.getvalue()
    # the header is written last over a placeholder: it must not grow with the count
    assert {len(pm._npy_header(n)) for n in (0, 1, 10**9, 2**63 - 1)} == {128}


# ---------------------------------------------------------------- dtype=: convert, never wrap

def test_dtype_converts_token_lists_and_empty_lists(in_tmp):
    header = pm.build_map([[5, 6, 7], [], [65535]], "toy", progress=False, dtype=np.uint16)
    assert header["dtype"] == "uint16"
    assert_same_items(read_back("toy"), [np.array([5, 6, 7], np.uint16), np.zeros(0, np.uint16),
                                         np.array([65535], np.uint16)])
    assert Path("toy.dat").stat().st_size == 8  # 2 bytes a token, not int64's 8
    assert pm.build_map([], "empty", progress=False, dtype="uint16")["dtype"] == "uint16"
    assert pm.build_map([[], []], "empties", progress=False, dtype="int8")["dtype"] == "int8"


@pytest.mark.parametrize("items, dtype, words", [
    ([[1, 2], [65536]], np.uint16, "item 1: the value 65536 does not fit uint16"),
    ([[1], [-1]], np.uint8, "item 1: the value -1 does not fit uint8"),
    ([[0.5]], np.int32, "item 0: the value 0.5 does not fit int32"),
    ([[1.0], [np.nan]], np.int64, "item 1: the value nan does not fit int64"),
    ([np.array([1e5])], np.float16, "item 0: the value 100000.0 does not fit float16"),
    ([[2], [3]], np.bool_, "item 0: the value 2 does not fit bool"),
])
def test_dtype_refuses_values_that_do_not_fit_naming_the_item(in_tmp, items, dtype, words):
    with pytest.raises(ValueError) as caught:
        pm.build_map(items, "toy", progress=False, dtype=dtype)
    assert words in str(caught.value) and "never wraps" in str(caught.value)
    assert listing(in_tmp) == []


def test_dtype_rounds_floats_and_keeps_what_fits(in_tmp):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    items = [np.array([0.1, -2.5, np.inf, np.nan]), np.array([1e30])]
    pm.build_map(items, "f32", progress=False, dtype=np.float32)
    assert_same_items(read_back("f32"), [a.astype(np.float32) for a in items])
    pm.build_map(items, "bf16", progress=False, dtype=ml_dtypes.bfloat16)
    assert_same_items(read_back("bf16"), [a.astype(ml_dtypes.bfloat16) for a in items])
    pm.build_map([np.array([1, 2], np.int8), [3.0]], "i16", progress=False, dtype=np.int16)
    assert_same_items(read_back("i16"), [np.array([1, 2], np.int16), np.array([3], np.int16)])
    with pytest.raises(TypeError, match=r"obj\.json: dtype=: dtype object holds Python objects"):
        pm.build_map([[1]], "obj", progress=False, dtype=object)


def test_a_bfloat16_tensor_without_ml_dtypes_names_the_item_and_the_fix(in_tmp):
    pytest.importorskip("torch")
    from test_load import run_python
    script = ("import sys\nsys.modules['ml_dtypes'] = None  # as if it were not installed\n"
              "import torch, picomap as pm\n"
              "pm.build_map([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)], 'toy', progress=False)")
    result = run_python(script, in_tmp)
    assert result.returncode != 0
    assert "TypeError: item 1: torch.bfloat16 needs the ml_dtypes package: pip install ml_dtypes" in result.stderr
    assert listing(in_tmp) == []


def test_a_dtype_numpy_does_not_know_is_refused_naming_the_map_and_field(in_tmp):
    with pytest.raises(TypeError, match=r"toy\.json: dtype=: 'int9' is not a dtype numpy knows"):
        pm.build_map([[1]], "toy", progress=False, dtype="int9")
    with pytest.raises(TypeError, match=r"ds\.json: dtype= for field 'a': 'int9' is not a dtype numpy knows"):
        pm.build_map([{"a": [1]}], "ds", progress=False, dtype={"a": "int9"})
    assert listing(in_tmp) == []


def test_a_torch_dtype_is_taken_as_its_numpy_dtype(in_tmp):
    torch = pytest.importorskip("torch")
    pm.build_map([[1.5, 2]], "f32", progress=False, dtype=torch.float32)
    assert pm.MapLoader("f32").dtype == np.float32
    pm.build_map([{"a": [3]}], "ds", progress=False, dtype={"a": torch.int16})
    assert pm.MapLoader("ds").dtype == {"a": np.int16}
    ml_dtypes = pytest.importorskip("ml_dtypes")
    pm.build_map([[1.5]], "bf16", progress=False, dtype=torch.bfloat16)
    assert pm.MapLoader("bf16").dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("call", ["get_loader_fn", "MapLoader", "build_map", "verify_hash", "map_files"])
def test_a_path_that_is_not_a_path_is_a_type_error(in_tmp, call):
    run = {"get_loader_fn": lambda: pm.get_loader_fn(None), "MapLoader": lambda: pm.MapLoader(None),
           "build_map": lambda: pm.build_map([[1]], None, progress=False),
           "verify_hash": lambda: pm.verify_hash(3), "map_files": lambda: pm.map_files(b"toy")}[call]
    with pytest.raises(TypeError, match="picomap: path must be a str or os.PathLike of str, not"):
        run()


def test_a_structured_dtype_with_ml_dtypes_fields_round_trips(in_tmp):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype([("w", ml_dtypes.bfloat16, (2,)), ("n", "<i4"), ("inner", [("f8", ml_dtypes.float8_e5m2)])])
    items = [np.zeros(3, dtype), np.ones(1, dtype)]
    pm.build_map(items, "toy", progress=False)
    recorded = read_json("toy")["dtype"]  # each ml_dtypes field by its type's name, not numpy's "<V2"
    assert recorded[0] == ["w", "bfloat16", [2]] and recorded[2] == ["inner", [["f8", "float8_e5m2"]]]
    load, _ = pm.get_loader_fn("toy")
    assert load.dtype == dtype
    assert_same_items([load(0), load(1)], items)
    assert pm.verify_hash("toy", progress=False)
    titled = np.dtype({"names": ["a"], "formats": ["<i4"], "titles": ["A"]})
    with pytest.raises(ValueError, match="gives another dtype back"):
        pm.build_map([np.zeros(1, titled)], "t", progress=False)
