"""verify_hash and update_hash_with_array, and compatibility with maps written by picomap 0.1."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

import picomap as pm
from conftest import LEGACY, LEGACY_NAMES, oracle_hash, read_json, tokens, traced_peak, write_json



def test_verify_passes_on_an_intact_map(in_tmp):
    pm.build_map(tokens(), "toy", progress=False)
    assert pm.verify_hash("toy", progress=False) is True
    assert pm.verify_hash(Path("toy.dat"), progress=False) is True


@pytest.mark.parametrize("offset", [0, 1234, -1])
def test_verify_catches_a_flipped_byte_and_names_both_hashes(in_tmp, offset):
    pm.build_map(tokens(), "toy", progress=False)
    stored = read_json("toy")["hash"]
    data = bytearray(Path("toy.dat").read_bytes())
    data[offset] ^= 0x10
    Path("toy.dat").write_bytes(data)
    with pytest.raises(ValueError) as caught:
        pm.verify_hash("toy", progress=False)
    message = str(caught.value)
    assert "hash mismatch" in message and stored in message and "toy.json" in message
    computed = message.split("hashes to ")[1][:32]
    assert computed != stored and len(computed) == 32


def test_verify_catches_offsets_that_move_a_boundary(in_tmp):
    pm.build_map([np.arange(4), np.arange(4)], "toy", progress=False)
    np.save("toy.starts.npy", np.array([0, 3, 8], np.uint64))  # still consistent, but other items
    with pytest.raises(ValueError, match="hash mismatch"):
        pm.verify_hash("toy", progress=False)


def test_verify_reads_in_batches_and_gets_the_same_hash(in_tmp, monkeypatch):
    items = tokens(300)
    pm.build_map(items, "toy", progress=False)
    monkeypatch.setattr(pm, "BATCH_BYTES", 8)  # many tiny batches
    assert pm.verify_hash("toy", progress=False)


def test_update_hash_with_array_is_the_per_item_frame():
    items = [np.arange(6, dtype=">i4").reshape(3, 2), np.asfortranarray(np.ones((2, 3))), np.zeros((0, 5), bool)]
    h = xxhash.xxh3_128(b"D|v1|")
    for item in items:
        assert pm.update_hash_with_array(h, item) is h
    h.update(b"D|end|")
    assert h.hexdigest() == oracle_hash(items)


def test_update_hash_with_array_depends_on_dtype_and_shape_not_only_bytes():
    def digest(a):
        return pm.update_hash_with_array(xxhash.xxh3_128(), a).hexdigest()
    a = np.arange(6, dtype=np.int32)
    assert len({digest(a), digest(a.reshape(2, 3)), digest(a.view(np.uint32)), digest(a.byteswap().view(">i4"))}) == 4
    assert digest(a.reshape(2, 3)) == digest(np.asfortranarray(a.reshape(2, 3)))


# ---------------------------------------------------------------- picomap 0.1

def legacy_items(name):
    with np.load(LEGACY / f"{name}.expected.npz") as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


@pytest.mark.parametrize("name", LEGACY_NAMES)
def test_reads_and_verifies_every_legacy_map(name):
    base = LEGACY / name
    assert pm.verify_hash(base, progress=False)
    load, n = pm.get_loader_fn(base)
    items = legacy_items(name)
    assert n == len(items) and load.meta == {}
    for i, want in enumerate(items):
        assert load(i).dtype == want.dtype
        np.testing.assert_array_equal(load(i), want)


@pytest.mark.parametrize("name", LEGACY_NAMES)
def test_same_items_give_the_legacy_hash_and_bytes(in_tmp, name):
    header = pm.build_map(legacy_items(name), name, progress=False)
    legacy = json.loads((LEGACY / f"{name}.json").read_text())
    assert header["hash"] == legacy["hash"]
    for key in ("trail_dim", "dtype", "count", "total_rows"):
        assert header[key] == legacy[key]
    for suffix in (".dat", ".starts.npy"):
        assert Path(f"{name}{suffix}").read_bytes() == (LEGACY / f"{name}{suffix}").read_bytes()


def test_the_legacy_recipe_gives_the_documented_hashes(in_tmp):
    """Independent of the fixtures folder: the items rebuilt from its README's recipe."""
    rng = np.random.default_rng(20261124)
    maps = {
        "ragged_f32": [rng.standard_normal((int(n), 4, 3)).astype(np.float32) for n in rng.integers(1, 9, 7)],
        "tokens_u16": [rng.integers(0, 50257, int(n)).astype(np.uint16) for n in rng.integers(1, 40, 50)],
        "flags_bool": [rng.random((int(n), 2)) > 0.5 for n in rng.integers(1, 5, 5)],
    }
    want = {"ragged_f32": "051ac42f6327ae2b89026db73985ccbe", "tokens_u16": "870addfe690fe69640b878e7aac66b04",
            "flags_bool": "624ddb6aa3e32e00119dee54f75a3c09"}
    for name, items in maps.items():
        assert pm.build_map(items, name, progress=False)["hash"] == want[name]


def test_a_legacy_reader_can_load_new_maps(in_tmp):
    """What 0.1 did to read a map: np.dtype(json dtype), np.load(starts), np.memmap of the data."""
    items = [np.arange(n * 2, dtype=">i4").reshape(n, 2) for n in (3, 1, 4)]
    pm.build_map(items, "toy", progress=False, meta={"extra": True})
    header = read_json("toy")
    starts = np.load("toy.starts.npy")
    data = np.memmap("toy.dat", dtype=np.dtype(header["dtype"]), mode="r",
                     shape=(header["total_rows"], *header["trail_dim"]))
    assert len(starts) == header["count"] + 1 and starts.ndim == 1
    for i, want in enumerate(items):
        np.testing.assert_array_equal(data[starts[i]:starts[i + 1]], want)
    shutil.copy(LEGACY / "flags_bool.json", "old.json")  # and the keys are the ones 0.1 wrote, and more
    assert set(json.loads(Path("old.json").read_text())) <= set(header)


@pytest.mark.parametrize("copy_below", [0, 10**9])  # every batch hashed in place / every batch copied
def test_both_hashing_paths_give_the_oracle_hash(in_tmp, monkeypatch, copy_below):
    monkeypatch.setattr(pm, "FRAME_COPY_BELOW", copy_below)
    maps = {"tok": tokens(300), "be": [np.full((n, 3), n, ">i2") for n in (0, 5, 1, 0, 2)],
            "odd": [np.zeros((n, 3), "S3") for n in (1, 4, 0)], "nothing": [np.zeros((n, 0)) for n in (2, 0, 3)],
            "rec": [np.ones((n, 2), [("a", "<i2"), ("b", ">f8")]) for n in (3, 0, 2)]}
    for name, items in maps.items():
        assert pm.build_map(items, name, progress=False)["hash"] == oracle_hash(items)
        assert pm.verify_hash(name, progress=False)


# ---------------------------------------------------------------- the hash covers the dtype

def test_swapping_structured_fields_in_the_json_fails_verify(in_tmp):
    dtype = np.dtype([("label", "<i4"), ("score", "<f4")])
    items = [np.array([(1, 0.5), (2, 0.25)], dtype), np.array([(3, 1.5)], dtype)]
    header = pm.build_map(items, "toy", progress=False)
    assert header["hash"] == oracle_hash(items)
    header["dtype"] = [["score", "<f4"], ["label", "<i4"]]  # the same 8 bytes a row, read another way
    write_json("toy", header)
    with pytest.raises(ValueError, match="hash mismatch: .* json's dtype, trail_dim or text differ"):
        pm.verify_hash("toy", progress=False)


@pytest.mark.parametrize("built, edited", [("float8_e4m3fn", "float8_e4m3fnuz"), ("bfloat16", "float16"),
                                           ("int4", "uint4"), ("float8_e5m2", "int8")])
def test_editing_an_ml_dtype_in_the_json_fails_verify(in_tmp, built, edited):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    items = [np.arange(n).astype(getattr(ml_dtypes, built)) for n in (4, 1)]
    header = pm.build_map(items, "toy", progress=False)
    assert header["dtype"] == built and header["hash"] == oracle_hash(items)
    assert pm.verify_hash("toy", progress=False)
    header["dtype"] = edited
    write_json("toy", header)
    with pytest.raises(ValueError, match="hash mismatch"):
        pm.verify_hash("toy", progress=False)


def test_the_same_bytes_under_two_dtypes_never_hash_alike():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    raw = np.arange(8, dtype=np.uint8)

    def digest(dtype):
        return pm.update_hash_with_array(xxhash.xxh3_128(), raw.view(dtype)).hexdigest()
    one_byte = [np.uint8, np.int8, np.bool_, "S1", "V1", ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz,
                ml_dtypes.float8_e5m2, ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.float4_e2m1fn]
    eight_bytes = [np.float64, np.int64, "V8", [("a", "<i4"), ("b", "<f4")], [("b", "<f4"), ("a", "<i4")],
                   [("a", "<i4"), ("b", "<i4")], [("a", "<u8")]]
    two_bytes = [np.float16, ml_dtypes.bfloat16, np.int16]
    digests = [digest(np.dtype(d)) for d in one_byte + eight_bytes + two_bytes]
    assert len(set(digests)) == len(digests)


def test_plain_dtypes_keep_the_0_1_frame_and_others_use_v2():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype in ["<f4", ">i4", "|b1", "<M8[ns]", "<m8[s]", "|S3", "<U2", "|V4", "<c16", "<f2"]:
        arr = np.zeros(2, dtype)
        frame = pm.update_hash_with_array(xxhash.xxh3_128(), arr).hexdigest()
        v1 = xxhash.xxh3_128(b"A|v1|" + arr.dtype.str.encode() + np.array([1, 2], "<i8").tobytes() + arr.tobytes())
        assert frame == v1.hexdigest()
    for dtype in [np.dtype([("a", "<i4")]), np.dtype(ml_dtypes.bfloat16)]:
        arr = np.zeros(2, dtype)
        text = pm._dtype_to_json(dtype)
        text = json.dumps(text).encode()
        v2 = xxhash.xxh3_128(b"A|v2|" + len(text).to_bytes(8, "little") + text
                             + np.array([1, 2], "<i8").tobytes() + arr.tobytes())
        assert pm.update_hash_with_array(xxhash.xxh3_128(), arr).hexdigest() == v2.hexdigest()


def test_verify_memory_is_one_batch_whatever_the_count(in_tmp):
    peaks = []
    for n in (100_000, 400_000):
        pm.build_map((np.full(1, k % 100, np.int8) for k in range(n)), f"m{n}", progress=False)
        peaks.append(traced_peak(lambda: pm.verify_hash(f"m{n}", progress=False)))
    assert peaks[1] < 16 << 20 and peaks[1] < peaks[0] + (1 << 20)  # before: 52 MB, and growing
