"""get_loader_fn: views and copies, Python's index rules, cheap opening, and clear errors for bad files."""
import json
import mmap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import read_json, tokens, write_json


@pytest.fixture
def toy(in_tmp):
    items = [np.arange(n * 3, dtype=np.float32).reshape(n, 3) + n for n in (2, 0, 5, 1)]
    pm.build_map(items, "toy", progress=False, meta={"source": "unit test"})
    return items


def test_load_returns_read_only_zero_copy_views(toy):
    load, n = pm.get_loader_fn("toy")
    assert n == len(toy) == len(load)
    for i, want in enumerate(toy):
        view = load(i)
        assert view.shape == want.shape and view.dtype == want.dtype
        np.testing.assert_array_equal(view, want)
        assert not view.flags.writeable
        assert view.size == 0 or np.shares_memory(view, load.data)
    with pytest.raises(ValueError, match="read-only"):
        load(0)[0, 0] = 1


def test_copy_is_private_and_writable(toy):
    load, _ = pm.get_loader_fn("toy")
    mine = load(2, copy=True)
    assert mine.flags.writeable and mine.flags.owndata
    mine[:] = -1
    np.testing.assert_array_equal(load(2), toy[2])


def test_indices_follow_python(toy):
    load, n = pm.get_loader_fn("toy")
    np.testing.assert_array_equal(load(-1), toy[-1])
    np.testing.assert_array_equal(load(-n), toy[0])
    for i in (np.int64(2), np.uint8(2), np.intp(-2)):
        np.testing.assert_array_equal(load(i), toy[int(i)])
    for bad in (n, -n - 1, 10**20, np.int64(n)):
        with pytest.raises(IndexError, match=f"item {bad} is out of range for a map of {n} items"):
            load(bad)
    for bad in (1.0, "1", None, slice(0, 1), np.float64(1)):
        with pytest.raises(TypeError, match="indices must be integers"):
            load(bad)


def test_sequence_protocol_and_attributes(toy):
    load, n = pm.get_loader_fn("toy")
    assert [x.tolist() for x in load] == [x.tolist() for x in toy]
    assert load[1].shape == (0, 3) and load[-1].tolist() == toy[-1].tolist()
    assert [x.tolist() for x in load.__getitems__([3, 0, 3])] == [toy[3].tolist(), toy[0].tolist(), toy[3].tolist()]
    assert load.dtype == np.float32 and load.trail_dim == (3,)
    assert load.lengths.tolist() == [2, 0, 5, 1] and load.lengths.dtype == np.int64
    assert load.lengths is load.lengths and not load.lengths.flags.writeable
    assert load.starts.tolist() == [0, 2, 2, 7, 8] and not load.starts.flags.writeable
    assert load.data.shape == (8, 3) and not load.data.flags.writeable
    assert load.meta == {"source": "unit test"}
    assert load.path == Path("toy") and load.hash == read_json("toy")["hash"]
    assert "4 items of float32" in repr(load)


def test_load_makes_no_mapping_and_reads_no_file_per_call(toy, monkeypatch):
    load, n = pm.get_loader_fn("toy")

    def forbidden(*args, **kwargs):
        raise AssertionError("load(i) touched the file system")
    monkeypatch.setattr(mmap, "mmap", forbidden)
    monkeypatch.setattr(pm, "open", forbidden, raising=False)
    monkeypatch.setattr(np, "load", forbidden)
    for i in range(n):
        np.testing.assert_array_equal(load(i, copy=True), toy[i])


def test_loader_keeps_serving_its_version_after_a_rebuild(toy):
    load, n = pm.get_loader_fn("toy")
    pm.build_map(tokens(7), "toy", progress=False)
    assert len(load) == n
    for i, want in enumerate(toy):
        np.testing.assert_array_equal(load(i), want)
    assert pm.get_loader_fn("toy")[1] == 7


def write_flat_map(base, n_items):
    """A valid map of n_items one-row int8 items, written without build_map so that it is quick."""
    np.save(f"{base}.starts.npy", np.arange(n_items + 1, dtype=np.uint64))
    Path(f"{base}.dat").write_bytes(bytes(n_items))
    write_json(base, {"trail_dim": [], "hash": "0" * 32, "creation_time": "", "dtype": "int8",
                      "count": n_items, "total_rows": n_items})


def test_opening_millions_of_items_costs_at_most_16_bytes_an_item(in_tmp):
    n_items = 2_000_000
    write_flat_map("big", n_items)
    tracemalloc.start()
    try:
        load, n = pm.get_loader_fn("big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == n_items and load(n_items - 1).shape == (1,)
    assert peak <= 16 * n_items + (1 << 20)


# ---------------------------------------------------------------- corrupt or missing files

def corrupt(base, what):
    """Damage the map at base in one way, named by what."""
    header, starts = read_json(base), np.load(f"{base}.starts.npy")
    dat = Path(f"{base}.dat")
    json_file, starts_file = Path(f"{base}.json"), Path(f"{base}.starts.npy")
    kind, _, detail = what.partition(":")
    if kind == "missing":
        Path(f"{base}{detail}").unlink()
    elif kind == "dat":
        data = dat.read_bytes()
        dat.write_bytes(data[:-1] if detail == "truncated" else data + b"\0")
    elif kind == "json-text":
        json_file.write_text({"garbage": "{not json", "array": "[1, 2]", "empty": "", "deep": "[" * 100_000,
                              "binary": "\udcff"}[detail], errors="surrogateescape")
    elif kind == "drop":
        del header[detail]
        write_json(base, header)
    elif kind == "set":
        key, value = detail.split("=", 1)
        header[key] = json.loads(value)
        write_json(base, header)
    elif kind == "starts":
        bad = {"short": starts[:-1], "long": np.append(starts, starts[-1]), "2d": starts.reshape(1, -1),
               "float": starts.astype(np.float64), "decreasing": starts[[0, 3, 1, 2, 4]],
               "not-zero": starts + 1, "wrong-end": np.append(starts[:-1], starts[-1] + 1),
               "objects": np.array(list(starts), dtype=object), "signed-negative": -starts.astype(np.int64)}
        if detail == "not-npy":
            starts_file.write_bytes(b"these are not offsets")
        elif detail == "truncated":
            starts_file.write_bytes(starts_file.read_bytes()[:-3])
        elif detail == "huge-header":  # claims a billion offsets: refused before allocating
            np.save(starts_file, starts)
            raw = starts_file.read_bytes().replace(b"(5,)", b"(1000000000,)".ljust(4))
            starts_file.write_bytes(raw)
        else:
            np.save(starts_file, bad[detail], allow_pickle=True)
    else:
        raise AssertionError(what)


CORRUPTIONS = {
    "missing:.dat": (FileNotFoundError, "toy.dat"),
    "missing:.starts.npy": (FileNotFoundError, "toy.starts.npy"),
    "missing:.json": (FileNotFoundError, "toy.json"),
    "dat:truncated": (ValueError, "toy.dat: holds 95 bytes but the json says 8 rows of 12 bytes = 96"),
    "dat:extended": (ValueError, "toy.dat: holds 97 bytes"),
    "json-text:garbage": (ValueError, "toy.json: not valid JSON"),
    "json-text:empty": (ValueError, "toy.json: not valid JSON"),
    "json-text:deep": (ValueError, "toy.json: not valid JSON"),
    "json-text:binary": (ValueError, "toy.json: not valid JSON"),
    "json-text:array": (ValueError, "toy.json: holds a JSON list, not an object"),
    **{f"drop:{key}": (ValueError, f"toy.json: missing key(s) {key}")
       for key in ("trail_dim", "hash", "dtype", "count", "total_rows")},
    "set:count=\"4\"": (ValueError, "toy.json: count must be a non-negative integer"),
    "set:count=-1": (ValueError, "toy.json: count must be a non-negative integer"),
    "set:count=4.0": (ValueError, "toy.json: count must be a non-negative integer"),
    "set:count=true": (ValueError, "toy.json: count must be a non-negative integer"),
    "set:count=1e30": (ValueError, "toy.json: count must be a non-negative integer"),
    "set:total_rows=18446744073709551616": (ValueError, "toy.json: total_rows must be a non-negative integer"),
    "set:count=5": (ValueError, "toy.starts.npy: holds 5 offsets but the json says count=5"),
    "set:total_rows=9": (ValueError, "toy.starts.npy: the last offset is 8 but the json says total_rows=9"),
    "set:total_rows=null": (ValueError, "toy.json: total_rows must be a non-negative integer"),
    "set:trail_dim=[-3]": (ValueError, "toy.json: trail_dim must be a list of non-negative integers"),
    "set:trail_dim=[1.5]": (ValueError, "toy.json: trail_dim must be a list of non-negative integers"),
    "set:trail_dim=3": (ValueError, "toy.json: trail_dim must be a list of non-negative integers"),
    "set:trail_dim=[4]": (ValueError, "toy.dat: holds 96 bytes but the json says 8 rows of 16 bytes"),
    "set:trail_dim=[0, 4611686018427387904]": (ValueError, "toy.dat: holds 96 bytes but the json says 8 rows of 0"),
    "set:dtype=\"O\"": (ValueError, "toy.json: dtype 'O' holds Python objects"),
    "set:dtype=[[\"a\", \"O\"]]": (ValueError, "holds Python objects"),
    "set:dtype=\"float33\"": (ValueError, "toy.json: dtype 'float33' is not a numpy dtype"),
    "set:dtype=7": (ValueError, "toy.json: dtype 7 is not a numpy dtype"),
    "set:hash=\"abc\"": (ValueError, "toy.json: hash must be 32 lowercase hex digits"),
    "set:format_version=2": (ValueError, "toy.json: format_version 2 is not one this picomap"),
    "set:meta=[]": (ValueError, "toy.json: meta must be a JSON object"),
    "starts:short": (ValueError, "toy.starts.npy: holds 4 offsets but the json says count=4, which needs 5"),
    "starts:long": (ValueError, "toy.starts.npy: holds 6 offsets"),
    "starts:2d": (ValueError, "toy.starts.npy: offsets must be a 1-D integer array"),
    "starts:float": (ValueError, "toy.starts.npy: offsets must be a 1-D integer array, not float64"),
    "starts:objects": (ValueError, "toy.starts.npy: offsets must be a 1-D integer array, not object"),
    "starts:not-zero": (ValueError, "toy.starts.npy: the first offset is 1, not 0"),
    "starts:signed-negative": (ValueError, "toy.starts.npy: the last offset is -8 but the json says total_rows=8"),
    "starts:wrong-end": (ValueError, "toy.starts.npy: the last offset is 9"),
    "starts:not-npy": (ValueError, "toy.starts.npy: not a valid .npy file"),
    "starts:truncated": (ValueError, "toy.starts.npy: 37 bytes of offsets where 40 are needed"),
    "starts:huge-header": (ValueError, "toy.starts.npy: holds 1000000000 offsets"),
}


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupt_or_missing_files_raise_naming_the_file(toy, what):
    corrupt("toy", what)
    error, message = CORRUPTIONS[what]
    for call in (pm.get_loader_fn, lambda p: pm.verify_hash(p, progress=False)):
        with pytest.raises(error) as caught:
            call("toy")
        assert type(caught.value) is error
        assert message in str(caught.value)


def test_an_oversized_json_is_refused_before_parsing(toy, monkeypatch):
    monkeypatch.setattr(pm, "MAX_JSON_BYTES", 64)
    with pytest.raises(ValueError, match="toy.json: .* bytes is more than a picomap json may hold"):
        pm.get_loader_fn("toy")


def test_zero_byte_rows_with_absurd_dims_are_refused_naming_the_map(in_tmp):
    pm.build_map([np.zeros((2, 0), np.int8)], "toy", progress=False)
    header = read_json("toy")
    header["trail_dim"] = [0, 2**62]
    write_json("toy", header)
    with pytest.raises(ValueError, match="toy.json: shape .* is not a valid array"):
        pm.get_loader_fn("toy")


def test_a_folder_with_no_map(in_tmp):
    with pytest.raises(FileNotFoundError, match="nothing.json: missing"):
        pm.get_loader_fn("nothing")
