"""Fuzzing: random byte changes to each file of a valid map. The loader refuses with a clear error or
serves exactly what the files say, item by item (it never reads the .digests file); verify_hash
catches every change to the data, the offsets and the .digests file."""
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import picomap as pm

EXAMPLES = 300  # each property's examples per run; README's Reliability section quotes these
SUFFIXES = (".dat", ".starts.npy", ".json", ".digests")
mutations = st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=4)
resize = st.one_of(st.none(), st.integers(-40, 40))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The bytes of a small valid map with ragged 2-D items and several blocks."""
    folder = tmp_path_factory.mktemp("pristine")
    rng = np.random.default_rng(7)
    items = [rng.standard_normal((int(n), 3)).astype(">f4") for n in rng.integers(0, 6, 12)]
    saved, pm.PIECE_BYTES = pm.PIECE_BYTES, 64
    try:
        pm.build_map(items, folder / "m", progress=False)
    finally:
        pm.PIECE_BYTES = saved
    return {suffix: (folder / f"m{suffix}").read_bytes() for suffix in SUFFIXES}


def damaged(data: bytes, changes, size_change) -> bytes:
    data = bytearray(data)
    if data:  # one change a position, each an xor by 1..255: every chosen byte really changes
        for position, xor in {position % len(data): xor for position, xor in changes}.items():
            data[position] ^= xor
    if size_change is not None:
        data = data[:max(0, len(data) + size_change)] if size_change < 0 else data + bytes(size_change)
    return bytes(data)


def what_the_files_say(files: dict) -> list[tuple[tuple, bytes] | None]:
    """Each item's shape and bytes, read with json and numpy alone; None for an item whose offsets
    are not in order within the data."""
    header = json.loads(files[".json"])
    dtype = np.lib.format.descr_to_dtype(header["dtype"])
    trail = tuple(header["trail_dim"])
    starts = np.load(io.BytesIO(files[".starts.npy"]), allow_pickle=False).astype(np.int64)
    in_order = bool(np.all(starts[1:] >= starts[:-1]))  # then every item is within 0..total_rows
    row = dtype.itemsize * math.prod(trail)
    return [((int(b - a), *trail), files[".dat"][a * row:b * row]) if in_order else None
            for a, b in zip(starts[:-1], starts[1:])]


def write(folder: Path, files: dict) -> Path:
    for suffix, data in files.items():
        (folder / f"m{suffix}").write_bytes(data)
    return folder / "m"


@FUZZ
@given(which=st.sampled_from(SUFFIXES), changes=mutations, size_change=resize)
# offsets 10 and 11 pushed far past the data (high bytes flipped): verify meets that before a decrease
@example(which=".starts.npy", changes=[(128 + 10 * 8 + 2, 6), (128 + 11 * 8 + 3, 1)], size_change=None)
def test_mutated_maps_are_refused_or_served_as_they_are(tmp_path, pristine, which, changes, size_change):
    files = {**pristine, which: damaged(pristine[which], changes, size_change)}
    base = write(tmp_path, files)
    try:
        load, n = pm.get_loader_fn(base)
    except (ValueError, FileNotFoundError) as e:
        assert which != ".digests", e  # a load never reads the .digests file: its changes are verify_hash's
        assert "m.json" in str(e) or "m.starts.npy" in str(e) or "m.dat" in str(e)
        return
    said = what_the_files_say(files)
    assert n == len(said)
    for i, item in enumerate(said):
        if item is None:  # the pristine map has one chunk of offsets: each of its items is refused
            with pytest.raises(ValueError, match=f"m.starts.npy: .*: item {i} is not served"):
                load(i)
        else:
            assert load(i).shape == item[0] and load(i).tobytes() == item[1]
    try:
        pm.verify_hash(base, progress=False)
    except ValueError as e:
        message = str(e)
        if which == ".digests":  # the data and offsets are intact: only the .digests file is blamed
            assert re.search(r"m\.digests: does not hold the digests of the map's pieces", message), message
            return
        # a hash that differs, or offsets out of order (decreasing, or past the data), or, the items
        # hashing as the json says, the json's digests of blocks of the .dat or of the offsets
        # differing from the files' (a change to the json, or to the bytes of the offsets file)
        assert "hash mismatch" in message or None in said and re.search(
            r"m\.starts\.npy: (offsets decrease|the offsets of items .* outside rows)", message) or \
            which == ".json" and re.search(r"m\.json: the items hash as the json says, but its digests of blocks "
                                           r"\[[0-9, ]+\] of m\.dat differ from the data's", message) or \
            which in (".json", ".starts.npy") and re.search(
                r"m\.json: its digests of m\.starts\.npy's blocks differ from the file's", message), message
    else:  # every byte of the .dat, the offsets file and the .digests file is digested: a change is caught
        assert which == ".json"


@FUZZ
@given(changes=mutations)
def test_verify_catches_every_change_to_the_data(tmp_path, pristine, changes):
    base = write(tmp_path, {**pristine, ".dat": damaged(pristine[".dat"], changes, None)})
    with pytest.raises(ValueError, match="hash mismatch: .* m.dat is damaged in [0-9]+ block"):
        pm.verify_hash(base, progress=False)
