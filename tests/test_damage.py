"""Block digests: verify_hash says which items are damaged, and never changes the content hash."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

import picomap as pm
from conftest import LEGACY, read_json, tokens, write_json

BLOCK = 256  # bytes; tests pick small pieces so that a small map has many


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(pm, "PIECE_BYTES", BLOCK)  # and at most 1,000 blocks: a block a piece here


def independent_block_digests(dat: Path, piece: int, per_block: int = 1) -> list[str]:
    """From the spec: xxh3_64 of each piece, then of each block's piece digests as little-endian uint64s."""
    data = dat.read_bytes()
    pieces = [xxhash.xxh3_64(data[k:k + piece]).intdigest().to_bytes(8, "little") for k in range(0, len(data), piece)]
    return [xxhash.xxh3_64(b"".join(pieces[k:k + per_block])).hexdigest() for k in range(0, len(pieces), per_block)]


def flip(dat: Path, *offsets):
    data = bytearray(dat.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    dat.write_bytes(data)


def test_build_and_merge_record_the_digest_of_every_block(in_tmp, small_blocks):
    items = tokens(60)
    header = pm.build_map(items, "toy", progress=False)
    assert header["block_bytes"] == header["piece_bytes"] == BLOCK
    assert header["block_digests"] == independent_block_digests(Path("toy.dat"), BLOCK)
    assert len(header["block_digests"]) > 10
    pm.build_map(items[:25], "a", progress=False)
    pm.build_map(items[25:], "b", progress=False)
    merged = pm.merge_maps(["a", "b"], "merged", progress=False)
    assert merged["block_digests"] == header["block_digests"] and merged["hash"] == header["hash"]


def test_block_size_does_not_change_the_content_hash(in_tmp, monkeypatch):
    hashes = set()
    for block in (1, 7, 4096, 64 << 20):
        monkeypatch.setattr(pm, "PIECE_BYTES", block)
        hashes.add(pm.build_map(tokens(30), f"m{block}", progress=False)["hash"])
    assert len(hashes) == 1


def test_damage_in_two_distant_blocks_names_exactly_their_items(in_tmp, small_blocks):
    # 100 items of 128 int32 rows = 512 bytes: two blocks an item, so a block never straddles two items
    items = [np.full(128, k, np.int32) for k in range(100)]
    pm.build_map(items, "toy", progress=False)
    flip(Path("toy.dat"), 7 * 512 + 3, 88 * 512 + 300)  # inside items 7 and 88
    with pytest.raises(ValueError) as caught:
        pm.verify_hash("toy", progress=False)
    message = str(caught.value)
    assert "hash mismatch" in message and "damaged in 2 block(s) of 256 bytes, holding items 7, 88:" in message


def test_damage_spanning_blocks_names_the_items_they_hold(in_tmp, small_blocks):
    items = [np.full(n, n, np.int16) for n in (10, 300, 5, 0, 40)]  # rows of 2 bytes
    pm.build_map(items, "toy", progress=False)
    flip(Path("toy.dat"), 100)  # block 0: bytes 0-255 = item 0 (20 bytes) and the start of item 1
    with pytest.raises(ValueError, match="holding items 0-1: rebuild those"):
        pm.verify_hash("toy", progress=False)


def test_moved_boundaries_blame_the_offsets_not_the_data(in_tmp, small_blocks):
    pm.build_map([np.arange(40), np.arange(40)], "toy", progress=False)
    np.save("toy.starts.npy", np.array([0, 30, 80], np.uint64))
    with pytest.raises(ValueError, match="every block of toy.dat is intact, so toy.starts.npy or the json's"):
        pm.verify_hash("toy", progress=False)


def test_maps_without_block_digests_get_the_plain_message(in_tmp):
    for suffix in (".dat", ".starts.npy", ".json"):
        shutil.copy(LEGACY / f"tokens_u16{suffix}", f"old{suffix}")
    flip(Path("old.dat"), 10)
    with pytest.raises(ValueError, match="hash mismatch: .*; old.dat or old.starts.npy is damaged or was changed$"):
        pm.verify_hash("old", progress=False)


@pytest.mark.parametrize("change", [
    {"block_bytes": 0}, {"block_bytes": "64"}, {"block_digests": "abc"}, {"block_digests": ["xyz"]},
    {"block_digests": None}, {"block_bytes": None}, {"piece_bytes": 0}, {"piece_bytes": 3}, {"piece_bytes": "1"},
])
def test_malformed_block_keys_are_refused(in_tmp, change):
    pm.build_map(tokens(5), "toy", progress=False)
    header = read_json("toy")
    header.update(change)
    write_json("toy", {k: v for k, v in header.items() if v is not None})
    with pytest.raises(ValueError, match="toy.json: (block_bytes must be a positive integer|piece_bytes must be)"):
        pm.get_loader_fn("toy")


def test_a_json_listing_too_many_blocks_is_refused_at_open(in_tmp, small_blocks):
    pm.build_map(tokens(20), "toy", progress=False)
    header = read_json("toy")
    header["block_digests"].append("0" * 16)
    header["hash"] = "0" * 32
    write_json("toy", header)
    for job in (pm.verify_hash, pm.get_loader_fn):
        with pytest.raises(ValueError, match="toy.json: 6 block digests .* do not fit the 1260 bytes of toy.dat, "
                                             "which make 5 blocks"):
            job("toy")


def test_pieces_are_grouped_into_at_most_max_blocks(in_tmp, monkeypatch):
    monkeypatch.setattr(pm, "PIECE_BYTES", 64)
    monkeypatch.setattr(pm, "MAX_BLOCKS", 4)
    items = [np.full(16, k, np.int32) for k in range(20)]  # 64 bytes an item: 20 pieces, 4 blocks of 5
    header = pm.build_map(items, "toy", progress=False)
    assert (header["block_bytes"], header["piece_bytes"]) == (320, 64)
    assert header["block_digests"] == independent_block_digests(Path("toy.dat"), 64, per_block=5)
    flip(Path("toy.dat"), 7 * 64 + 1)  # item 7, in block 1: items 5-9
    with pytest.raises(ValueError, match="damaged in 1 block.s. of 320 bytes, holding items 5-9: rebuild"):
        pm.verify_hash("toy", progress=False)


def test_damage_is_located_to_a_mebibyte_in_a_small_map(in_tmp):
    items = [np.full(1024, k, np.int32) for k in range(1024)]  # 4 KiB items, 4 MiB in all
    header = pm.build_map(items, "toy", progress=False)
    assert header["block_bytes"] == 1 << 20 and len(header["block_digests"]) == 4
    flip(Path("toy.dat"), (2 << 20) + 12345, (2 << 20) + 99999)  # two bytes in the third MiB
    with pytest.raises(ValueError, match="damaged in 1 block.s. of 1048576 bytes, holding items 512-767: rebuild"):
        pm.verify_hash("toy", progress=False)


def test_blocks_digested_whole_as_picomap_1_0_wrote_them_still_locate_damage(in_tmp):
    items = [np.full(128, k, np.int32) for k in range(100)]  # 512 bytes an item
    pm.build_map(items, "toy", progress=False)
    header = read_json("toy")
    del header["piece_bytes"], header["starts_block_bytes"], header["starts_block_digests"]  # as 1.0 wrote it
    Path("toy.digests").unlink()  # (1.0 wrote no .digests file)
    data = Path("toy.dat").read_bytes()
    header["block_bytes"], header["block_digests"] = 1024, [xxhash.xxh3_64(data[k:k + 1024]).hexdigest()
                                                            for k in range(0, len(data), 1024)]
    write_json("toy", header)
    assert pm.verify_hash("toy", progress=False)
    flip(Path("toy.dat"), 41 * 512)
    with pytest.raises(ValueError, match="damaged in 1 block.s. of 1024 bytes, holding items 40-41: rebuild"):
        pm.verify_hash("toy", progress=False)


# ---------------------------------------------------------------- the .digests file (picomap 1.4)

def piece_digests(path: Path, piece: int = 1 << 20) -> list[int]:
    """From the spec: the xxh3_64 of each piece of a file, as the .digests file holds them."""
    data = path.read_bytes()
    return [xxhash.xxh3_64(data[k:k + piece]).intdigest() for k in range(0, len(data), piece)]


def test_a_changed_byte_in_the_digests_file_fails_verify_naming_it(in_tmp):
    items = [np.full(1 << 18, k, np.int32) for k in range(3)]  # 1 MiB an item: three pieces of the .dat
    pm.build_map(items, "toy", progress=False)
    assert pm.verify_hash("toy", progress=False)
    flip(Path("toy.digests"), 8 + 3)  # in the second piece's digest
    with pytest.raises(ValueError, match=r"^toy\.digests: does not hold the digests of the map's pieces") as caught:
        pm.verify_hash("toy", progress=False)
    assert "hash mismatch" not in str(caught.value)  # the data is intact, and not blamed
    load, n = pm.get_loader_fn("toy")  # loads never read the .digests file
    assert n == 3 and all(np.array_equal(load(i), item) for i, item in enumerate(items))


def test_an_edited_digest_of_the_offsets_in_the_json_fails_verify_but_not_loads(in_tmp):
    items = tokens(40)
    pm.build_map(items, "toy", progress=False)
    header = read_json("toy")
    digest = header["starts_block_digests"][0]
    header["starts_block_digests"][0] = ("1" if digest[0] == "0" else "0") + digest[1:]  # still 16 hex digits
    write_json("toy", header)
    with pytest.raises(ValueError, match=r"^toy\.json: its digests of toy\.starts\.npy's blocks differ from the "
                                         r"file's"):
        pm.verify_hash("toy", progress=False)
    load, n = pm.get_loader_fn("toy")
    assert n == len(items) and all(np.array_equal(load(i), item) for i, item in enumerate(items))


def test_the_digests_file_holds_each_pieces_digest_of_the_dat_then_of_the_offsets(in_tmp):
    n_items = 200_000  # more than 131,072: an offsets file of more than 1 MiB, so several pieces
    items = [np.full(k % 5, k, np.int32) for k in range(n_items)]
    header = pm.build_map(items, "toy", progress=False)
    dat, starts = Path("toy.dat"), Path("toy.starts.npy")
    assert starts.stat().st_size > 1 << 20 and dat.stat().st_size > 1 << 20
    assert pm.verify_hash("toy", progress=False)
    found = np.fromfile("toy.digests", "<u8").tolist()
    assert len(found) == -(-dat.stat().st_size // (1 << 20)) + -(-starts.stat().st_size // (1 << 20))
    assert found == piece_digests(dat) + piece_digests(starts)
    assert Path("toy.digests").stat().st_size == 8 * len(found)
    assert header["piece_bytes"] == 1 << 20 and header["starts_block_bytes"] % header["piece_bytes"] == 0
    assert header["starts_block_digests"] == independent_block_digests(
        starts, 1 << 20, per_block=header["starts_block_bytes"] // (1 << 20))
    load, n = pm.get_loader_fn("toy")
    assert n == n_items and all(np.array_equal(load(i), items[i]) for i in (0, 4, 131_072, n_items - 1))
