"""get_loader_fn: views and copies, Python's index rules, cheap opening, and clear errors for bad files."""
import contextlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import picomap as pm
from conftest import anonymous_bytes, read_json, tokens, write_json


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
    for bad in (1.0, "1", None, np.float64(1)):
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


FILE_EVENTS = {"open", "mmap.__new__", "os.listdir", "os.scandir", "io.open"}
_recording: list = []


def _audit(event, args):
    if _recording and event in FILE_EVENTS:
        _recording[0].append(event)


sys.addaudithook(_audit)  # for the whole session: a hook cannot be removed, so it records only when asked


def file_events(work) -> list[str]:
    """The file-system audit events (opens, mappings) that happen while work() runs."""
    events = []
    _recording.append(events)
    try:
        work()
    finally:
        _recording.clear()
    return events


def test_offsets_are_int64_so_arithmetic_with_lengths_stays_integer(toy):
    load, _ = pm.get_loader_fn("toy")
    end = load.starts[2] + load.lengths[2]
    assert end.dtype == np.int64 and load.data[load.starts[2]:end].shape == (5, 3)
    assert load.starts[0] - 64 == -64 and (load.starts[:-1] + load.lengths == load.starts[1:]).all()


def test_meta_cannot_drift(toy):
    load, _ = pm.get_loader_fn("toy")
    mine = load.meta
    mine["source"] = "changed"
    mine["new"] = [1]
    assert load.meta == {"source": "unit test"}


# ---------------------------------------------------------------- slices: splits without copies

def test_a_slice_is_a_dataset_over_its_items(in_tmp):
    items = tokens(30, seed=5)
    pm.build_map(items, "toy", progress=False)
    load, n = pm.get_loader_fn("toy")
    for a, b in [(0, 30), (5, 12), (-10, None), (None, 3), (7, 7), (25, 100), (-100, 2)]:
        part, want = load[a:b], items[a:b]
        assert len(part) == len(want) and isinstance(part, pm.MapLoader)
        assert [x.tolist() for x in part] == [x.tolist() for x in want]
        assert [part(i).tolist() for i in range(-len(want), 0)] == [x.tolist() for x in want]
        assert part.lengths.tolist() == [len(x) for x in want]
        assert part.starts.tolist() == np.cumsum([0] + [len(x) for x in want]).tolist()
        assert part.data.tobytes() == b"".join(x.tobytes() for x in want)
        if want:
            assert np.shares_memory(part(0), load.data) or part(0).size == 0
        with pytest.raises(IndexError):
            part(len(want))
    inner = load[5:25][3:10]  # a slice of a slice: items 8..14
    assert [x.tolist() for x in inner] == [x.tolist() for x in items[8:15]]
    assert "items 8-14 (7)" in repr(inner)
    with pytest.raises(ValueError, match="only contiguous slices"):
        load[::2]


def test_a_slice_pickles_as_its_items(in_tmp):
    import pickle
    items = tokens(30, seed=6)
    pm.build_map(items, "toy", progress=False)
    val = pickle.loads(pickle.dumps(pm.get_loader_fn("toy")[0][24:]))
    assert len(val) == 6 and [x.tolist() for x in val] == [x.tolist() for x in items[24:]]


def test_a_slice_over_damaged_offsets_refuses_naming_map_items(in_tmp):
    chunk = 1 << pm.CHECK_SHIFT
    write_flat_map("big", 3 * chunk)
    damage_offsets("big", chunk + 10, 5)
    load, _ = pm.get_loader_fn("big")
    # a slice's ends are checked by the whole map's loader: one in a damaged chunk is refused
    with pytest.raises(ValueError, match=f"offsets decrease at item {chunk + 9} .*: item {chunk} is not served"):
        load[chunk:]
    part = load[:chunk]  # its last offset is chunk 0's last, intact
    assert part(chunk - 1).shape == (1,)
    with pytest.raises(ValueError, match=f"offsets decrease at item {chunk + 9}"):
        load(chunk + 3)
    damage_offsets("big", 2 * chunk + 50, 10**9)  # past the data's rows
    load, _ = pm.get_loader_fn("big")
    with pytest.raises(ValueError, match=f"big.starts.npy: offsets decrease at item {2 * chunk + 50}"):
        load[2 * chunk + 50:2 * chunk + 60]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(1, 59), st.integers(0, 80)), min_size=1, max_size=3),
       cuts=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=2, max_size=6))
def test_slices_of_a_damaged_map_never_serve_overlapping_rows(in_tmp, monkeypatch, damage, cuts):
    """Whatever the damage, items served through any slices of one loader keep to the data and
    to themselves: no row is served as part of two different items."""
    monkeypatch.setattr(pm, "CHECK_SHIFT", 2)  # offsets checked 4 items at a time: many chunks
    write_flat_map("flat", 60)
    for at, value in damage:
        damage_offsets("flat", at, value)
    with contextlib.suppress(ValueError):  # damage at an end is refused at open
        load, n = pm.get_loader_fn("flat")
        owner = {}  # row -> the map's item that was served with it
        for a, b in cuts:
            try:
                part = load[min(a, b):max(a, b)]
            except ValueError:
                continue
            for i in range(len(part)):
                try:
                    item = part(i)
                except ValueError:
                    continue
                start = item.__array_interface__["data"][0] - load.data.__array_interface__["data"][0]
                for row in range(start, start + len(item)):
                    assert 0 <= row < 60 and owner.setdefault(row, min(a, b) + i) == min(a, b) + i


def test_load_makes_no_mapping_and_opens_no_file_per_call(toy):
    box = {}
    opening = file_events(lambda: box.update(load=pm.get_loader_fn("toy")[0]))
    assert "open" in opening and "mmap.__new__" in opening  # the hook sees what picomap does
    load = box["load"]
    loading = file_events(lambda: [load(i, copy=copy) for i in (*range(len(toy)), -1) for copy in (False, True)])
    assert loading == []


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
               "not-zero": starts + np.uint64(1), "wrong-end": np.append(starts[:-1], starts[-1] + np.uint64(1)),
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


# ---------------------------------------------------------------- what a path may name

@pytest.mark.parametrize("given", ["toy", "toy.dat", "toy.json", "toy.starts.npy", "toy.digests", Path("toy.json")])
def test_any_of_its_files_names_the_map(toy, given):
    load, n = pm.get_loader_fn(given)
    assert n == len(toy) and load.path == Path("toy")
    assert pm.verify_hash(given, progress=False)


@pytest.mark.parametrize("bad", [".", "..", "sub/..", "sub/.", "../"])
def test_folders_are_not_maps(in_tmp, bad):
    for call in (lambda: pm.build_map([[1]], bad, progress=False), lambda: pm.get_loader_fn(bad)):
        with pytest.raises(ValueError, match="names a folder, not a map"):
            call()
    assert os.listdir(in_tmp) == []


@pytest.mark.parametrize("suffix", [".dat", ".starts.npy", ".json", ".digests"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_map_file_that_is_no_regular_file_is_refused_at_once(toy, suffix, kind):
    target = Path(f"toy{suffix}")
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block until a writer came
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to("/dev/zero")
    calls = [lambda p: pm.verify_hash(p, progress=False)]
    if suffix == ".digests":  # a load never opens the .digests file: verify_hash alone reads it
        load, n = pm.get_loader_fn("toy")
        assert n == len(toy) and all(np.array_equal(load(i), item) for i, item in enumerate(toy))
    else:
        calls.insert(0, pm.get_loader_fn)
    for call in calls:
        with pytest.raises(ValueError, match=f"toy{suffix}: .*(not a regular file|a folder)"):
            call("toy")


# ---------------------------------------------------------------- ml_dtypes

ML_SCRIPT = """
import sys, numpy as np, picomap as pm
{prelude}
assert "ml_dtypes" not in sys.modules
load, n = pm.get_loader_fn("bf")
print(n, load.dtype, load(1).astype(np.float32).tolist(), "ml_dtypes" in sys.modules)
"""


def run_python(script, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(pm.__file__).parent)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_fresh_process_opens_an_ml_dtypes_map_importing_ml_dtypes_itself(in_tmp):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    items = [np.array([1.5, -2.0], ml_dtypes.bfloat16), np.array([0.25, 3.0, 8.0], ml_dtypes.bfloat16)]
    pm.build_map(items, "bf", progress=False)
    result = run_python(ML_SCRIPT.format(prelude=""), in_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "bfloat16", "[0.25,", "3.0,", "8.0]", "True"]
    cli = run_python("import sys, picomap; sys.exit(picomap.main(['verify', 'bf']))", in_tmp)
    assert cli.returncode == 0 and "intact" in cli.stdout


def test_without_ml_dtypes_the_error_says_how_to_get_it(in_tmp):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    pm.build_map([np.zeros(2, ml_dtypes.float8_e4m3fn)], "bf", progress=False)
    blocked = 'sys.modules["ml_dtypes"] = None  # as if it were not installed'
    result = run_python(ML_SCRIPT.format(prelude=blocked).replace('assert "ml_dtypes" not in sys.modules', ""),
                        in_tmp)
    assert result.returncode != 0
    assert "bf.json: dtype float8_e4m3fn needs the ml_dtypes package: pip install ml_dtypes" in result.stderr
    cli = run_python(f"import sys\n{blocked}\nimport picomap\nsys.exit(picomap.main(['info', 'bf']))", in_tmp)
    assert cli.returncode == 1 and "pip install ml_dtypes" in cli.stderr and "Traceback" not in cli.stderr


# ---------------------------------------------------------------- close

def mapped_or_open(path: Path) -> bool:
    """Whether this process still maps the file or holds a descriptor of it."""
    real = str(path.resolve())
    maps = Path("/proc/self/maps").read_text()
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    return real in maps or real in fds


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_close_releases_the_files_once_no_view_is_alive(toy):
    import gc
    with pm.MapLoader("toy") as load:
        view = load(2)
        assert mapped_or_open(Path("toy.dat")) and mapped_or_open(Path("toy.starts.npy"))
    for call in (lambda: load(0), lambda: load[-1], lambda: load(0, copy=True), lambda: load.data,
                 lambda: load.starts, lambda: load.lengths):
        with pytest.raises(ValueError, match="toy: the loader is closed"):
            call()
    np.testing.assert_array_equal(view, toy[2])  # a view handed out before stays valid
    gc.collect()
    assert mapped_or_open(Path("toy.dat"))  # ... because it keeps the mapping alive
    del view
    gc.collect()
    assert not mapped_or_open(Path("toy.dat")) and not mapped_or_open(Path("toy.starts.npy"))


# ---------------------------------------------------------------- offsets mapped, checked a chunk at a time

@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc")
def test_ten_million_items_open_without_reading_the_offsets(in_tmp):
    n_items = 10_000_000
    write_flat_map("big", n_items)
    before = anonymous_bytes()
    tracemalloc.start()
    try:
        load, n = pm.get_loader_fn("big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == n_items and peak < 1 << 20  # reading them would take 80 MB
    picks = np.random.default_rng(0).integers(0, n_items, 2000)
    assert all(load(int(i)).shape == (1,) for i in picks)  # checks most chunks on the way
    assert anonymous_bytes() - before < 4 << 20
    assert load.starts.dtype == np.int64 and not load.starts.flags.writeable


def damage_offsets(base, at, value):
    starts = np.load(f"{base}.starts.npy")
    starts[at] = value
    np.save(f"{base}.starts.npy", starts)


def test_damaged_offsets_in_the_middle_refuse_their_items_only(in_tmp):
    chunk = 1 << pm.CHECK_SHIFT
    write_flat_map("big", 5 * chunk)
    damage_offsets("big", 2 * chunk + 100, 10)  # in chunk 2: item 2*chunk+99 would end before it starts
    load, n = pm.get_loader_fn("big")
    for i in (0, chunk - 1, 2 * chunk - 1, 3 * chunk, n - 1, -1):
        assert load(i).shape == (1,)
    for i in (2 * chunk, 2 * chunk + 99, 3 * chunk - 1, 2 * chunk - n):
        with pytest.raises(ValueError, match=f"big.starts.npy: offsets decrease at item {2 * chunk + 99} "
                                             rf"\({2 * chunk + 99} then 10\): item {i % n} is not served"):
            load(i)
    with pytest.raises(ValueError, match=f"big.starts.npy: offsets decrease at item {2 * chunk + 99}"):
        pm.verify_hash("big", progress=False)
    with pytest.raises(ValueError, match="offsets decrease"):
        _ = load.lengths


def test_a_chunk_shifted_whole_is_refused_the_same_whatever_was_loaded_before(in_tmp):
    chunk = 1 << pm.CHECK_SHIFT
    write_flat_map("big", 4 * chunk)
    starts = np.load("big.starts.npy")
    starts[chunk + 1:2 * chunk + 1] += chunk + 50  # chunk 1 still rises within itself, but ends after chunk 3 begins
    np.save("big.starts.npy", starts)
    for order in ([chunk + 5, 3 * chunk + 5], [3 * chunk + 5, chunk + 5]):  # two loaders, two orders:
        load, _ = pm.get_loader_fn("big")  # as two DataLoader workers, each with its own loader
        served = {}
        for i in order:
            try:
                served[i] = load(i)
            except ValueError as e:
                assert "outside rows" in str(e) and f"item {i} is not served" in str(e)
        assert list(served) == [chunk + 5]  # the same verdict in every order: never both, which would overlap


DAMAGE_EXAMPLES = 150  # README's Reliability section quotes this


@settings(max_examples=DAMAGE_EXAMPLES, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=40),
       damage=st.lists(st.tuples(st.integers(1, 39), st.integers(0, 200)), max_size=3),
       order=st.lists(st.integers(-40, 39), max_size=60))
def test_served_items_never_overlap_and_stay_in_the_data(tmp_path_factory, lengths, damage, order):
    """Whatever the damage and the order of loads, items served by any loaders of one map keep to
    the data and to themselves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pm, "CHECK_SHIFT", 2)  # chunks of 4 items, so that a small map has many
        patch.chdir(tmp_path_factory.mktemp("damage"))
        pm.build_map([np.arange(n, dtype=np.int16) for n in lengths], "m", progress=False)
        starts = np.load("m.starts.npy")
        for at, value in damage:
            if at < len(lengths):  # first and last are checked at open; the rest lazily
                starts[at] = value
        np.save("m.starts.npy", starts)
        valid = bool(np.all(starts[1:] >= starts[:-1]))
        served = []  # by two loaders, in opposite orders: two DataLoader workers, say
        for loader_order in (order, order[::-1]):
            load, n = pm.get_loader_fn("m")
            for i in loader_order:
                if not -n <= i < n:
                    continue
                try:
                    item = load(i)
                except ValueError as e:
                    assert not valid and "m.starts.npy" in str(e)
                    continue
                k = i % n
                a, b = int(starts[k]), int(starts[k + 1])
                assert 0 <= a <= b <= starts[-1] and item.tobytes() == load.data[a:b].tobytes()
                served.append((a, b))
        for a, b in served:
            assert all(b <= c or d <= a or (a, b) == (c, d) or a == b or c == d for c, d in served)


def test_the_whole_maps_data_is_the_mapped_array_itself(toy):
    import mmap
    load, _ = pm.get_loader_fn("toy")
    assert load.data is load.data and isinstance(load.data.base, mmap.mmap)  # e.g. to madvise it


@pytest.mark.parametrize("version, keeps_fd", [((3, 11), True), ((3, 13), False)])
def test_from_python_3_13_a_mapping_keeps_no_file_descriptor(toy, monkeypatch, version, keeps_fd):
    import mmap
    calls = []
    real = mmap.mmap

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{k: v for k, v in kwargs.items() if k != "trackfd"})
    monkeypatch.setattr(mmap, "mmap", recording)
    monkeypatch.setattr(sys, "version_info", version)
    load, _ = pm.get_loader_fn("toy")
    assert len(calls) == 2 and all(("trackfd" not in c) == keeps_fd for c in calls)
    assert all(c.get("trackfd", True) is keeps_fd for c in calls)


class KeepsTheLoader:
    """The README's pattern: a dataset keeps the loader and takes load.data where it reads."""

    def __init__(self, load):
        self.load = load

    def __getitem__(self, k):
        return self.load.data[k]


def test_a_dataset_keeping_the_loader_pickles_as_a_path_and_one_keeping_data_as_its_bytes(in_tmp):
    import pickle
    pm.build_map([np.arange(n, dtype=np.int32) for n in range(1000)], "toy", progress=False)
    load, _ = pm.get_loader_fn("toy")
    good = pickle.dumps(KeepsTheLoader(load))
    assert len(good) < 1000 and pickle.loads(good)[-1] == load.data[-1]
    assert len(pickle.dumps(load.data)) > load.data.nbytes  # what the README says not to keep
