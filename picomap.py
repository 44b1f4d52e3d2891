"""picomap: a ragged dataset of numpy arrays on disk, verified, loaded as zero-copy views.

A map at base path ``B`` is four files: ``B.dat``, the items' bytes in C order, back to back;
``B.starts.npy``, ``count + 1`` offsets in rows (item ``i`` is rows ``starts[i]:starts[i+1]``);
``B.json``, the dtype, trailing shape, counts, content hash and the user's ``meta``;
``B.digests``, the digest of every 1 MiB piece of the .dat and the offsets, by which a copy
elsewhere is read piece by piece. Dict items make a set: ``B.json`` naming one such map per field
in ``B.fields/BUILD/``. README.md's "File format" is the specification of every byte and key, and
of the content hash; this module implements it.

The sections follow the data: the format (paths, json, dtypes), the content hash, opening a map's
files, opening one at a URL through a local cache, committing a build, writing (build_map,
MapWriter), merging (the writer fed whole maps), verifying, loading (MapLoader), sampling,
windows, mixtures, and the command line.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import glob
import io
import json
import math
import heapq
import mmap
import numbers
import operator
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
import time
import weakref
from array import array
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import xxhash
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock; commits are still atomic per file
    fcntl = None

__version__ = "1.4.0"
__all__ = ["build_map", "MapWriter", "merge_maps", "verify_hash", "get_loader_fn", "update_hash_with_array",
           "MapLoader", "Sampler", "Windows", "Mix", "map_files", "main"]

FORMAT_VERSION = 1
# A json bigger than this is refused before parsing: a damaged or hostile file must not exhaust memory.
MAX_JSON_BYTES = 64 << 20
# meta may take half of that; the rest is for picomap's own keys, block digests above all.
MAX_META_BYTES = MAX_JSON_BYTES // 2
# ... and a json of more commas, colons and brackets than this is refused before parsing, which
# costs up to ~90 bytes for each: a hostile json of 64 MiB of "[{},{},...]" would take 1.4 GiB.
MAX_JSON_VALUES = 1 << 22
MAX_META_VALUES = MAX_JSON_VALUES - (1 << 20)  # room for picomap's keys and block digests
# build_map copies items into a buffer of this many bytes, then writes and hashes them in one go:
# large enough that per-call overheads vanish, small enough to stay in cache and keep memory flat.
BATCH_BYTES = 1 << 20
# ... and at most this many items a batch, so that memory stays flat for items of no bytes too.
BATCH_ITEMS = 1 << 16
# Items under this many bytes on average are hashed by copying them, with their frame headers, into
# one buffer (cheaper than two Python calls an item); larger ones are fed to xxhash where they lie.
FRAME_COPY_BELOW = 1024
# os.copy_file_range moves at most this much per call, so that the progress bar moves too.
COPY_CHUNK_BYTES = 64 << 20
# So that verify_hash can say which items are damaged, a build digests each 1 MiB piece of the .dat
# and records the digests of at most MAX_BLOCKS blocks of whole pieces: damage is located to 1/1000
# of the map or 1 MiB, whichever is larger, and the json holds at most ~20 KB of digests.
PIECE_BYTES = 1 << 20
MAX_BLOCKS = 1000
# Offsets of another integer type or byte order than the host's uint64 cannot be mapped as they are;
# up to this many are read and converted at open (8 MiB), more are refused: opening stays O(1).
MAX_CONVERTED_OFFSETS = 1 << 20
# A loader checks the offsets of 2**CHECK_SHIFT items (128 KiB of them) the first time one of those
# items is loaded, rather than all of them at open: opening stays O(1) and the offsets stay shared.
CHECK_SHIFT = 14
# access="auto" reads a map cold (exactly each item's pages, no readahead around them) when its .dat
# is larger than this share of the memory the page cache may use: a map that fits is served from
# memory after its first pass, one that does not is read from disk again and again, and readahead
# around every random read would multiply the bytes read (by up to 2,000 here: 8 MiB for 4 KiB).
COLD_ABOVE = 0.5


# ---------------------------------------------------------------- format: paths, json, dtypes

_SUFFIXES = (".dat", ".starts.npy", ".json", ".digests")
_MAP_KEYS = ("trail_dim", "hash", "dtype", "count", "total_rows")
_SET_KEYS = ("fields", "build", "hash", "count")
_EMPTY_LAYOUT = (np.dtype(np.float64), ())  # what a map of no items records; no item depends on it
_FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# Names numpy knows only once ml_dtypes is imported (bfloat16, float8_e4m3fn, int4, ...).
_ML_DTYPE_NAME = re.compile(r"bfloat16|b?complex32|float[468]_e\w+|u?int[124]")


class _TextKind(NamedTuple):
    """An item kind stored as uint8 bytes: what its json's ``text`` says, its Python type, and both ways."""
    name: str
    type: type
    encode: Callable
    decode: Callable


# A new text kind is a row here: the writer, the hash's tail, the json check and the loader read this table.
_TEXT_KINDS = {kind.name: kind for kind in (
    _TextKind("str", str, str.encode, lambda raw: str(raw, "utf-8")),
    _TextKind("bytes", bytes, bytes, bytes))}


class MapFiles(NamedTuple):
    """The files of one map: its items' bytes, offsets, json, and the digests of their 1 MiB pieces."""
    dat: Path
    starts: Path
    json: Path
    digests: Path  # absent from maps written before picomap 1.4


def map_files(path: str | os.PathLike) -> MapFiles:
    """The files of the map at ``path``: its base (``"ds/train"``) or any of its files.

    One trailing ``.dat``, ``.starts.npy``, ``.json`` or ``.digests`` is stripped, nothing else:
    ``"v1.2/train.v2"`` names ``v1.2/train.v2.dat`` etc. For a set, only the json of these
    exists: its fields live in the folder ``NAME.fields`` beside it, so copying or deleting a set
    takes that folder too (``shutil.copytree``, ``shutil.rmtree``). Raises TypeError for a path
    that is not a str or os.PathLike of str, ValueError for one that names a folder. Cost: no I/O.
    """
    try:
        base = os.fspath(path)
    except TypeError:
        base = None
    if not isinstance(base, str):
        raise TypeError(f"picomap: path must be a str or os.PathLike of str, not {type(path).__name__}")
    if _is_url(base):
        raise ValueError(f"picomap: {base!r} is a URL; picomap reads maps at URLs (get_loader_fn, MapLoader, "
                         "verify_hash) but builds, merges and opens here local files only")
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    if os.path.basename(base) in ("", ".", ".."):
        raise ValueError(f"picomap: {os.fspath(path)!r} names a folder, not a map")
    return MapFiles(*(Path(base + suffix) for suffix in _SUFFIXES))


def _fields_folder(files: MapFiles) -> Path:
    """The folder under which a set keeps each build's field maps: NAME.fields beside NAME.json."""
    return files.json.with_name(files.json.name.removesuffix(".json") + ".fields")


def _import_ml_dtypes(what: str, error: type[Exception]):
    """ml_dtypes, which registers bfloat16 and its kin with numpy; imported only when a map needs it."""
    try:
        import ml_dtypes
    except ImportError:
        raise error(f"{what} needs the ml_dtypes package: pip install ml_dtypes") from None
    return ml_dtypes


def _dtype_to_json(dtype: np.dtype) -> str | list:
    return _ml_fields_named(np.lib.format.dtype_to_descr(dtype), dtype) if dtype.fields is not None else str(dtype)


def _ml_fields_named(descr: list, dtype: np.dtype) -> list:
    """A structured dtype's .npy descr with each ml_dtypes field named by its type's name
    ("bfloat16"), where the descr says only "<V2": so that the json gives the dtype back."""
    named = []
    for entry in descr:
        name = entry[0] if isinstance(entry[0], str) else entry[0][1]  # (title, name) for a titled field
        field = dtype.fields[name][0].base if name in (dtype.fields or {}) else None
        if field is not None and field.fields is not None:
            entry = (entry[0], _ml_fields_named(entry[1], field), *entry[2:])
        elif field is not None and _ML_DTYPE_NAME.fullmatch(str(field)):
            entry = (entry[0], str(field), *entry[2:])
        named.append(entry)
    return named


def _ml_names_in(value: Any) -> list:
    """The ml_dtypes type names a json dtype uses: itself, or its fields' types."""
    if isinstance(value, str):
        return [value] if _ML_DTYPE_NAME.fullmatch(value) else []
    if isinstance(value, list):
        return [name for entry in value if isinstance(entry, list) and len(entry) > 1
                for name in _ml_names_in(entry[1])]
    return []


def _dtype_from_json(value: Any, where: Path | str) -> np.dtype:
    for name in _ml_names_in(value)[:1]:
        _import_ml_dtypes(f"{where}: dtype {name}", ValueError)
    try:
        dtype = np.lib.format.descr_to_dtype(value)
    except Exception as e:  # numpy raises a zoo of types on hostile input; all mean the same here
        raise ValueError(f"{where}: dtype {value!r} is not a numpy dtype ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{where}: dtype {value!r} holds Python objects, which picomap never maps")
    return dtype


def _check_layout(dtype: np.dtype, where: str) -> None:
    """Refuse a dtype a map cannot hold: Python objects, or one its json would not give back."""
    if dtype.hasobject:
        raise TypeError(f"{where}: dtype {dtype} holds Python objects; picomap stores plain bytes only")
    recorded = None
    with contextlib.suppress(ValueError, TypeError):  # titled, overlapping or out-of-order fields: no descr
        recorded = json.loads(json.dumps(_dtype_to_json(dtype)))
        if _dtype_from_json(recorded, where) == dtype:
            return
    raise ValueError(f"{where}: dtype {dtype} cannot be recorded in a map's json (its .npy description "
                     f"{recorded} gives another dtype back, as titled, overlapping or out-of-order fields do); "
                     "use plain fields in order")


def _is_hex(text: Any, digits: int) -> bool:
    return isinstance(text, str) and len(text) == digits and all(c in "0123456789abcdef" for c in text)


def _is_count(value: Any) -> bool:
    """A non-negative int that fits the int64/uint64 arithmetic numpy does with it."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_field_name(name: Any) -> bool:
    """A field's name is its map's file name: plain characters, and no suffix of a map's files."""
    return isinstance(name, str) and bool(_FIELD_NAME.fullmatch(name)) and not name.endswith(_SUFFIXES)


class _MapJson(NamedTuple):
    """What a map's json says, checked."""
    dtype: np.dtype
    trail_dim: tuple[int, ...]
    count: int
    total_rows: int
    hash: str
    meta: dict
    block_bytes: int | None = None  # None for maps written before block digests (0.1)
    block_digests: list | None = None
    piece_bytes: int | None = None  # None for blocks digested whole (1.0)
    text: str | None = None  # "str" or "bytes" for a map of text items
    starts_block_bytes: int | None = None  # None for maps written before the .digests file (1.4)
    starts_block_digests: list | None = None

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.trail_dim)

    @property
    def layout(self) -> tuple:
        """What its items are: what the shards of a merge must agree on."""
        return self.dtype, self.trail_dim, self.text


class _SetJson(NamedTuple):
    """What a set's json says, checked."""
    fields: dict  # field name -> the hash its map's json must hold, in the items' key order
    build: str  # the folder, under NAME.fields, that holds this build's field maps
    count: int
    hash: str
    meta: dict


def _read_json(json_file: Path, handle) -> dict:
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{json_file}: {size} bytes is more than a picomap json may hold ({MAX_JSON_BYTES})")
    return _parse_json(json_file, handle.read())


def _parse_json(json_file: Path | str, text: bytes) -> dict:
    values = _json_values(text)
    if values > MAX_JSON_VALUES:
        raise ValueError(f"{json_file}: {values:,} commas, colons and brackets, more than a picomap json "
                         f"may hold ({MAX_JSON_VALUES:,}); it is refused before parsing")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{json_file}: holds a JSON {type(raw).__name__}, not an object")
    return raw


def _json_values(text: bytes | str) -> int:
    """The commas, colons and opening brackets of a JSON text, counted without parsing: each value
    but the first follows a comma or a colon or opens a container, so parsing it costs at most
    ~90 bytes for each (a key, its value and a dict's slot)."""
    if isinstance(text, str):
        text = text.encode()
    return text.count(b",") + text.count(b":") + text.count(b"[") + text.count(b"{") + 1


def _check_keys(json_file: Path, raw: dict, required: tuple) -> tuple[str, dict]:
    """The checks a map's json and a set's share; returns the hash and meta."""
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{json_file}: missing key(s) {', '.join(missing)}")
    if not _is_count(raw["count"]):
        raise ValueError(f"{json_file}: count must be a non-negative integer, not {raw['count']!r}")
    if not _is_hex(raw["hash"], 32):
        raise ValueError(f"{json_file}: hash must be 32 lowercase hex digits, not {raw['hash']!r}")
    version = raw.get("format_version", 1)
    if not _is_count(version) or version > FORMAT_VERSION:
        raise ValueError(f"{json_file}: format_version {version!r} is not one this picomap "
                         f"({__version__}) reads; upgrade picomap")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{json_file}: meta must be a JSON object, not {type(meta).__name__}")
    return raw["hash"], meta


def _read_map_json(json_file: Path, raw: dict) -> _MapJson:
    digest, meta = _check_keys(json_file, raw, _MAP_KEYS)
    if not _is_count(raw["total_rows"]):
        raise ValueError(f"{json_file}: total_rows must be a non-negative integer, not {raw['total_rows']!r}")
    trail = raw["trail_dim"]
    if not isinstance(trail, list) or not all(_is_count(d) for d in trail):
        raise ValueError(f"{json_file}: trail_dim must be a list of non-negative integers, not {trail!r}")
    block_bytes, blocks = raw.get("block_bytes"), raw.get("block_digests")
    if (block_bytes is None) != (blocks is None) or blocks is not None and not (
            _is_count(block_bytes) and block_bytes > 0 and isinstance(blocks, list)
            and all(_is_hex(b, 16) for b in blocks)):
        raise ValueError(f"{json_file}: block_bytes must be a positive integer and block_digests a list of "
                         "16-hex-digit strings, both or neither")
    pieces = raw.get("piece_bytes")
    if pieces is not None and not (blocks is not None and _is_count(pieces) and pieces > 0
                                   and block_bytes % pieces == 0):
        raise ValueError(f"{json_file}: piece_bytes must be a positive integer that divides block_bytes")
    starts_bytes, starts_blocks = raw.get("starts_block_bytes"), raw.get("starts_block_digests")
    if (starts_bytes is None) != (starts_blocks is None) or starts_blocks is not None and not (
            pieces is not None and _is_count(starts_bytes) and starts_bytes > 0 and starts_bytes % pieces == 0
            and isinstance(starts_blocks, list) and all(_is_hex(b, 16) for b in starts_blocks)):
        raise ValueError(f"{json_file}: starts_block_bytes must be a multiple of piece_bytes and "
                         "starts_block_digests a list of 16-hex-digit strings, both or neither")
    dtype, text = _dtype_from_json(raw["dtype"], json_file), raw.get("text")
    if text is not None and (text not in _TEXT_KINDS or dtype != np.uint8 or trail):
        raise ValueError(f"{json_file}: text must be \"str\" or \"bytes\", and only for uint8 items of no "
                         f"trailing shape, not {text!r} for {dtype} {tuple(trail)}")
    return _MapJson(dtype, tuple(trail), raw["count"], raw["total_rows"], digest, meta, block_bytes, blocks,
                    pieces, text, starts_bytes, starts_blocks)


def _read_set_json(json_file: Path, raw: dict) -> _SetJson:
    digest, meta = _check_keys(json_file, raw, _SET_KEYS)
    fields, build = raw["fields"], raw["build"]
    if not (isinstance(fields, dict) and fields and all(
            _is_field_name(name) and _is_hex(h, 32) for name, h in fields.items())):
        raise ValueError(f"{json_file}: fields must map field names (letters, digits, _ . -) to 32-hex-digit "
                         "hashes")
    if not _is_hex(build, 12):  # the build's tag, which names its fields' folder
        raise ValueError(f"{json_file}: build must be 12 hex digits, not {build!r}")
    return _SetJson(fields, build, raw["count"], digest, meta)


def _map_json(layout: tuple, count: int, total_rows: int, digest: str, blocks: dict, meta: dict) -> dict:
    """A map's json. The 0.1 keys come first, with their 0.1 meanings, so a 0.1 reader still loads it."""
    dtype, trail, text = layout
    header = {"trail_dim": list(trail), "hash": digest, "creation_time": _now(), "dtype": _dtype_to_json(dtype),
              "count": count, "total_rows": total_rows, "format_version": FORMAT_VERSION, "meta": meta, **blocks}
    if text is not None:
        header["text"] = text
    return header


def _set_json(fields: dict, build: str, meta: dict) -> dict:
    """A set's json, from its fields' jsons (in the items' key order)."""
    hashes = {name: field["hash"] for name, field in fields.items()}
    return {"fields": hashes, "build": build, "count": next(iter(fields.values()))["count"],
            "hash": _set_hash(hashes), "creation_time": _now(), "format_version": FORMAT_VERSION, "meta": meta}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- content hash and digests

_MAP_HEAD, _MAP_TAIL, _ITEM_TAG, _ITEM_TAG_V2 = b"D|v1|", b"D|end|", b"A|v1|", b"A|v2|"
_SET_HEAD, _SET_TAIL = b"S|v1|", b"S|end|"


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (works for datetimes, which refuse buffers)."""
    return arr.reshape(-1).view(np.uint8)


def _dtype_tag(dtype: np.dtype) -> bytes:
    """The start of every frame of this dtype: v1 (picomap 0.1's) where ``dtype.str`` names the dtype
    alone, else v2, which names it by its json text (structured dtypes, ml_dtypes types)."""
    with contextlib.suppress(TypeError):  # ml_dtypes' float8_e5m2 says "<f1", which numpy cannot parse
        if np.dtype(dtype.str) == dtype:
            return _ITEM_TAG + dtype.str.encode("ascii")
    text = json.dumps(_dtype_to_json(dtype)).encode()
    return _ITEM_TAG_V2 + struct.pack("<q", len(text)) + text


def _frame_header(dtype: np.dtype, shape: tuple) -> bytes:
    """What precedes an item's bytes in the hashed stream: its dtype's tag, ndim and shape."""
    return _dtype_tag(dtype) + struct.pack(f"<{len(shape) + 1}q", len(shape), *shape)


def _map_tail(text: str | None) -> bytes:
    """The end of a map's hashed stream: for text maps it also says which text, str or bytes."""
    return _MAP_TAIL if text is None else b"D|" + text.encode() + _MAP_TAIL[1:]


def _set_hash(fields: dict) -> str:
    """A set's hash: xxh3_128 of its fields' names and hashes, in name order, framed."""
    h = xxhash.xxh3_128(_SET_HEAD)
    for name in sorted(fields):
        encoded = name.encode()
        h.update(struct.pack("<q", len(encoded)) + encoded + bytes.fromhex(fields[name]))
    h.update(_SET_TAIL)
    return h.hexdigest()


def update_hash_with_array(h, arr) -> Any:
    """Feed one item's frame into the xxhash object ``h`` and return ``h``.

    The frame is the dtype's tag, ndim and shape as little-endian int64s, then the C-order bytes,
    so equal arrays always hash alike, whatever their memory layout. The tag is ``b"A|v1|"`` and
    ``dtype.str`` (picomap 0.1's frame) where that names the dtype, else ``b"A|v2|"`` with the
    json's dtype text, so that two dtypes of the same bytes never hash alike::

        >>> h = xxhash.xxh3_128(b"D|v1|")
        >>> update_hash_with_array(h, np.arange(3, dtype=np.int32)).update(b"D|end|")

    gives the hash ``build_map`` stores for that one-item map. Cost: one pass over the bytes
    (plus a copy when ``arr`` is not C-contiguous).
    """
    arr = np.asarray(arr, order="C")
    h.update(_frame_header(arr.dtype, arr.shape))
    h.update(_as_bytes(arr))
    return h


def _update_hash_with_items(h, rows: np.ndarray, lengths: np.ndarray) -> None:
    """Feed the frames of consecutive items into h: ``rows`` holds their rows back to back (C order),
    ``lengths`` their first dimensions. The same stream as update_hash_with_array on each item, in
    far fewer calls: small items are framed into one buffer, large ones are hashed in place."""
    if len(lengths) == 0:
        return
    trail = rows.shape[1:]
    one = np.frombuffer(_frame_header(rows.dtype, (0, *trail)), np.uint8)
    headers = np.tile(one, (len(lengths), 1))  # the frames differ only in the first dimension, ...
    at = len(one) - 8 * (len(trail) + 1)  # ... the int64 before the trailing shape's
    headers[:, at:at + 8] = lengths.astype("<i8").view(np.uint8).reshape(-1, 8)
    data, row_bytes = _as_bytes(rows), rows.dtype.itemsize * math.prod(trail)
    if data.nbytes < FRAME_COPY_BELOW * len(lengths):
        h.update(_interleave(headers, data, lengths, row_bytes))
        return
    update, width = h.update, headers.shape[1]
    heads, body, start = memoryview(headers.reshape(-1)), memoryview(data), 0
    for k, end in enumerate(np.cumsum(lengths * row_bytes).tolist()):
        update(heads[k * width:(k + 1) * width])
        update(body[start:end])
        start = end


def _interleave(headers: np.ndarray, data: np.ndarray, lengths: np.ndarray, row_bytes: int) -> np.ndarray:
    """header 0, item 0's bytes, header 1, item 1's bytes, ... as one array, built by numpy.

    Example: two headers of 4 bytes HHHH, hhhh, items of 2 and 1 rows of 2 bytes (aabb, c):
    counts = [4, 4, 4, 2] bytes (in units of gcd(4, 2, 8) = 2 bytes: [2, 2, 2, 1]); the mask
    repeats [header, data] by those counts, and the result is HHHH aabb hhhh cc."""
    n, width = headers.shape
    unit = np.dtype(f"u{math.gcd(width, row_bytes, 8)}")  # the widest unit every piece is made of
    counts = np.empty(2 * n, np.int64)
    counts[0::2], counts[1::2] = width // unit.itemsize, lengths * (row_bytes // unit.itemsize)
    is_data = np.repeat(np.tile([False, True], n), counts)
    framed = np.empty(len(is_data), unit)
    framed[is_data] = data.view(unit)
    framed[~is_data] = headers.view(unit).ravel()
    return framed


class _BlockDigests:
    """xxh3_64 of each consecutive piece_bytes of a byte stream fed in pieces of any size: 8 bytes
    of memory a piece, 8 MB for a terabyte."""

    def __init__(self, piece_bytes: int):
        self.piece_bytes, self.digests = piece_bytes, array("Q")
        self.hash, self.left = xxhash.xxh3_64(), piece_bytes

    def update(self, data: np.ndarray) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            piece, data = data[:self.left], data[self.left:]
            self.hash.update(piece)
            self.left -= len(piece)
            if self.left == 0:
                self.digests.append(self.hash.intdigest())
                self.hash, self.left = xxhash.xxh3_64(), self.piece_bytes

    def pieces(self) -> array:
        """The digest of every piece, the last, partial one included."""
        if self.left < self.piece_bytes:
            self.digests.append(self.hash.intdigest())
            self.hash, self.left = xxhash.xxh3_64(), self.piece_bytes
        return self.digests

    def grouped(self, per_block: int | None = None) -> tuple[int, list]:
        """The bytes a block and each block's digest: pieces grouped into at most MAX_BLOCKS blocks
        (or per_block pieces a block), a block's digest being the xxh3_64 of its pieces' digests as
        little-endian uint64s, as the .digests file holds them."""
        pieces = np.array(self.pieces(), "<u8")
        per_block = per_block or max(1, -(-len(pieces) // MAX_BLOCKS))
        digests = [xxhash.xxh3_64(pieces[k:k + per_block].tobytes()).hexdigest()
                   for k in range(0, len(pieces), per_block)]
        return per_block * self.piece_bytes, digests


# ---------------------------------------------------------------- opening: files, locks, mappings

class _Map(NamedTuple):
    """A map's files, opened and checked in O(1): its json and its two mapped arrays."""
    files: MapFiles
    header: _MapJson
    starts: np.ndarray  # int64, count + 1, mapped; only both ends checked
    data: np.ndarray  # read-only, mapped
    identity: tuple  # the mapped .dat's device, inode, size and mtime: the file, not its name
    remote: _Remote | None = None  # for a map at a URL, what fetches its pieces into these files


class _Set(NamedTuple):
    """A set's json and each field's _Map, opened and checked against each other."""
    files: MapFiles  # only its json is the set's own file
    header: _SetJson
    fields: dict  # field name -> _Map


@contextlib.contextmanager
def _folder_lock(folder: Path, exclusive: bool):
    """Hold flock on the folder: a commit takes it exclusively, an opener shared, so no opener reads
    the json of one build with the data of another. Where flock is missing, go on without it."""
    fd = None
    with contextlib.suppress(OSError):  # (a FIFO where the folder should be is refused, never waited on)
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0))
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _open(path: str | os.PathLike) -> _Map | _Set:
    """Open, check and map the map or set at path, in O(1) time and memory whatever its item count."""
    files = map_files(path)
    for _ in range(3):
        if os.path.lexists(_intent(files)):  # a commit was cut short: finish it first
            with _folder_lock(files.json.parent, exclusive=True) as folder_fd:
                _recover(files, folder_fd)
        # one shared lock for all the files, the fields' too: a commit waits for it, so they are one build's
        with _folder_lock(files.json.parent, exclusive=False):
            if os.path.lexists(_intent(files)):  # a commit that failed since: no commit runs under this lock
                continue
            with _regular_file(files.json) as handle:
                raw, read = _read_json(files.json, handle), _identity(handle)[:2]
            opened = _open_set(files, _read_set_json(files.json, raw)) if "fields" in raw else \
                _open_map_files(files, _read_map_json(files.json, raw), follow=True)
            # where the folder could not be locked (one this process may enter, not list), a commit may
            # have run meanwhile: it holds an intent from before its first rename to after its last
            if not os.path.lexists(_intent(files)) and _inode(files.json, follow=True) == read:
                return opened
    raise ValueError(f"{_intent(files)}: commits of this map keep failing; open it again later")


def _open_map_files(files: MapFiles, header: _MapJson, follow: bool) -> _Map:
    with _regular_file(files.starts, follow) as handle:
        starts = _map_starts(files.starts, handle, header)
        starts_bytes = os.fstat(handle.fileno()).st_size
    with _regular_file(files.dat, follow) as handle:  # size check and mapping on one handle: one file, never two
        data = _map_rows(handle, files, header)
        _check_digests(files, header, data.nbytes, starts_bytes)
        return _Map(files, header, starts, data, _identity(handle))


def _open_set(files: MapFiles, header: _SetJson) -> _Set:
    """A set's fields, opened from its build folder: picomap's own files there, never links."""
    folder = _fields_folder(files) / header.build
    if folder.parent.is_symlink():  # a build would clean up through it, in another set's folder maybe
        raise ValueError(f"{files.json}: {folder.parent} is a link; a set keeps its fields in a folder of its own")
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise ValueError(f"{files.json}: {folder} is not a folder (a link, a file or a FIFO); a set's fields "
                             "are maps in a folder of their own")
    except FileNotFoundError:
        raise FileNotFoundError(f"{files.json}: its fields' folder {folder} is missing; a set is NAME.json and "
                                "the folder NAME.fields beside it: copy or move both") from None
    fields = {}
    for name, digest in header.fields.items():
        field_files = map_files(folder / name)
        with _regular_file(field_files.json, follow=False) as handle:
            raw = _read_json(field_files.json, handle)
        fields[name] = _open_map_files(field_files, _read_map_json(field_files.json, raw), follow=False)
        _check_field(files.json, header, name, digest, fields[name])
    return _Set(files, header, fields)


def _check_field(set_json: Path | str, header: _SetJson, name: str, digest: str, field: _Map) -> None:
    if field.header.hash != digest or field.header.count != header.count:
        raise ValueError(f"{set_json}: field {name!r} ({field.files.json}) holds {field.header.count} items "
                         f"of hash {field.header.hash}, not the {header.count} of hash {digest} the set "
                         "records: it comes from another build")


def _regular_file(path: Path, follow: bool = True):
    """path opened for reading, if it is a regular file (and, unless follow, not a link): never
    blocks on a FIFO or reads a device."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (a map is its files side by side: NAME.dat, "
                                "NAME.starts.npy, NAME.json and, since picomap 1.4, NAME.digests)") from None
    except IsADirectoryError:  # where a folder cannot be opened at all
        raise ValueError(f"{path}: a folder, not a map file") from None
    except NotADirectoryError:
        raise ValueError(f"{path}: its folder is not a folder (a file or a FIFO)") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path}: a link, where a set keeps its own files only") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a folder, FIFO or device); a map's files are regular files")
    return os.fdopen(fd, "rb")


def _identity(handle) -> tuple:
    info = os.fstat(handle.fileno())
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _mmap(handle) -> mmap.mmap:
    # From Python 3.13 a mapping need not keep a duplicate of the file descriptor: then an open
    # map holds no descriptor at all, however many are open.
    no_fd = {"trackfd": False} if sys.version_info >= (3, 13) else {}
    return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ, **no_fd)


def _map_starts(starts_file: Path, handle, header: _MapJson) -> np.ndarray:
    """The offsets as a read-only int64 array, mapped, not read: the header, the size and the first
    and last offsets are checked here, the rest by whoever reads them (``_check_offsets``)."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"npy version {version} is not used for offsets")
    except Exception as e:  # numpy's header parser raises many types on damaged input (even TokenError)
        raise ValueError(f"{starts_file}: not a valid .npy file ({type(e).__name__}: {e})") from None
    if dtype.kind not in "iu" or len(shape) != 1:
        raise ValueError(f"{starts_file}: offsets must be a 1-D integer array, not {dtype} of shape {shape}")
    if shape[0] != header.count + 1:
        raise ValueError(f"{starts_file}: holds {shape[0]} offsets but the json says count={header.count}, "
                         f"which needs {header.count + 1}")
    offset = handle.tell()
    left = os.fstat(handle.fileno()).st_size - offset
    if left != dtype.itemsize * shape[0]:
        raise ValueError(f"{starts_file}: {left} bytes of offsets where {dtype.itemsize * shape[0]} "
                         "are needed (file seems not fully written?)")
    if dtype.itemsize == 8 and dtype.isnative:  # as picomap writes them; uint64 values past 2**63 turn negative
        starts = np.ndarray(shape, dtype, buffer=_mmap(handle), offset=offset).view(np.int64)
    elif shape[0] <= MAX_CONVERTED_OFFSETS:  # another writer's integers: read and converted, O(N)
        starts = np.fromfile(handle, dtype, shape[0]).astype(np.int64)
        starts.flags.writeable = False
    else:
        raise ValueError(f"{starts_file}: {shape[0]:,} offsets of {dtype.str}, which picomap would have to read "
                         f"and convert whole; rewrite them as native uint64 (np.save(path, np.load(path)"
                         ".astype(np.uint64)))")
    if starts[0] != 0:
        raise ValueError(f"{starts_file}: the first offset is {starts[0]}, not 0")
    if starts[-1] != header.total_rows:
        raise ValueError(f"{starts_file}: the last offset is {starts[-1]} but the json says "
                         f"total_rows={header.total_rows}")
    return starts


def _map_rows(handle, files: MapFiles, header: _MapJson) -> np.ndarray:
    """An open .dat's rows as a read-only array of shape (total_rows, *trail_dim), once its size is checked."""
    size, expected = os.fstat(handle.fileno()).st_size, header.total_rows * header.row_bytes
    if size != expected:
        raise ValueError(f"{files.dat}: holds {size} bytes but the json says {header.total_rows} rows "
                         f"of {header.row_bytes} bytes = {expected} (file seems not fully written?)")
    shape = (header.total_rows, *header.trail_dim)
    try:
        if size == 0:  # mmap refuses empty files
            rows = np.empty(shape, header.dtype)
            rows.flags.writeable = False
            return rows
        # read-only, because the mapping is; the mapping outlives the handle
        return np.ndarray(shape, header.dtype, buffer=_mmap(handle))
    except ValueError as e:  # numpy's own message would not say which map
        raise ValueError(f"{files.json}: shape {shape} of {header.dtype} is not a valid array ({e})") from None


def _check_digests(files: MapFiles, header: _MapJson, nbytes: int, starts_bytes: int) -> None:
    """Refuse block digests that do not fit the .dat (or the offsets): as many as its size makes
    blocks, and pieces few enough (a million, or one a KiB) that locating damage stays one cheap pass."""
    if header.block_digests is None:
        return
    piece = header.piece_bytes or header.block_bytes  # 1.0 digested whole blocks
    for name, size, block_bytes, digests in [(files.dat.name, nbytes, header.block_bytes, header.block_digests), (
            files.starts.name, starts_bytes, header.starts_block_bytes, header.starts_block_digests)]:
        if digests is None:  # (offsets digested since 1.4 only)
            continue
        blocks = -(-size // block_bytes)
        if len(digests) != blocks or -(-size // piece) > max(1 << 20, size >> 10):
            raise ValueError(f"{files.json}: {len(digests)} block digests of {block_bytes} bytes (pieces of "
                             f"{piece}) do not fit the {size} bytes of {name}, which make {blocks} blocks")


def _check_offsets(offsets: np.ndarray, first_item: int, low: int, high: int, where: Path) -> None:
    """Raise ValueError unless ``offsets`` (those of items ``first_item``, ``first_item + 1``, ...)
    never decrease and lie within ``low..high``: then their items overlap no other and lie in the data."""
    decreasing = offsets[1:] < offsets[:-1]
    if decreasing.any():
        k = int(np.argmax(decreasing))
        raise ValueError(f"{where}: offsets decrease at item {first_item + k} ({offsets[k]} then {offsets[k + 1]})")
    if offsets[0] < low or offsets[-1] > high:
        raise ValueError(f"{where}: the offsets of items {first_item}-{first_item + len(offsets) - 2} run from "
                         f"{offsets[0]} to {offsets[-1]}, outside rows {low}-{high} that the items around them leave")


def _runs(starts: np.ndarray, row_bytes: int, where: Path):
    """Yield ``(i, offsets)``: the offsets of items i, i+1, ..., each run holding about 4 batches of
    bytes (at least one item, at most BATCH_ITEMS) and checked before it is yielded. Each run's last
    offset is the next one's first; once the generator is exhausted every offset was checked."""
    rows_per_run, count, i = max(1, 4 * BATCH_BYTES // max(row_bytes, 1)), len(starts) - 1, 0
    while i < count:
        window = starts[i:i + BATCH_ITEMS + 1]
        end_row = min(int(window[0]) + rows_per_run, 2**63 - 1)
        j = min(max(i + int(np.searchsorted(window, end_row, side="right")) - 1, i + 1), count)
        offsets = starts[i:j + 1]
        _check_offsets(offsets, i, 0, int(starts[-1]), where)
        yield i, offsets
        i = j


# ---------------------------------------------------------------- maps elsewhere: URLs, pieces, a local cache

# How a map at a URL is read (README, "Maps elsewhere"). Its json is fetched whole, once; its .dat,
# .starts.npy and .digests are fetched in pieces as items need them: PIECE_BYTES of the .dat and of
# the offsets, a json block's share of the .digests. Every piece is checked against its digest (a
# .dat or offsets piece's is in the .digests file, a .digests block's in the json) before it is
# written into a sparse copy of its file in the cache, CACHE/HASH/NAME.*, at its own offset: items
# are then views of a mapped local file, as a local map's are. Every process checks a piece again
# the first time it reads it from the cache, so a piece half-written by a process that died, or
# damaged since, is fetched again and never served; and no lock is ever taken, so none can hang.

REMOTE_REQUESTS = 8  # requests in flight at once, per process
REMOTE_RUN_BYTES = 4 << 20  # one request asks for at most this: runs of missing pieces coalesced up to it
REMOTE_TRIES = 4  # tries of a request that fails transiently (5xx, 429, a timeout, a dropped connection)
REMOTE_TIMEOUT = 60  # seconds a request may wait for a byte before it is given up, then tried again


def _is_url(path) -> bool:
    return isinstance(path, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _default_cache() -> Path:
    """$PICOMAP_CACHE, else picomap in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("PICOMAP_CACHE"):
        return Path(os.environ["PICOMAP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "picomap"


class _Transient(Exception):
    """A request that failed in a way that trying again may mend."""


class _Http:
    """GETs of whole files or byte ranges over http(s), by the standard library: one connection per
    thread, made in the process that uses it (none crosses a fork), reused while it lives."""

    def __init__(self):
        self._local, self._pid = threading.local(), os.getpid()

    def get(self, url: str, span: tuple | None, etag: str | None, hops: int = 0) -> tuple[bytes, str | None, int]:
        """The bytes of url in ``span`` (start, end), or all of it; its ETag; its size. Redirects
        (a CDN's, a hub's) are followed, up to 5."""
        import http.client
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        headers = {} if span is None else {"Range": f"bytes={span[0]}-{span[1] - 1}"}
        if etag is not None:
            headers["If-Match"] = etag
        connections, key = self._connections(), (parts.scheme, parts.netloc)
        connection = connections.get(key) or self._connect(connections, parts)
        try:
            connection.request("GET", parts.path + ("?" + parts.query if parts.query else ""), headers=headers)
            response = connection.getresponse()
            if response.status == 200 and span is not None:  # never read whole: it may be terabytes
                raise ValueError(f"{url}: the server answered a request for bytes {span[0]}-{span[1] - 1} with the "
                                 "whole file (it ignores Range); picomap reads maps from servers that serve ranges")
            limit = MAX_JSON_BYTES if span is None else span[1] - span[0]
            body = response.read(limit + 1)  # never more than was asked for, whatever the server sends
            if len(body) > limit:
                raise ValueError(f"{url}: more than the {limit} bytes asked for" if span else
                                 f"{url}: more bytes than a picomap json may hold ({MAX_JSON_BYTES})")
            if span is not None and response.status == 206 and len(body) < limit:  # the connection broke
                raise http.client.IncompleteRead(body, limit - len(body))
        except BaseException as e:  # the connection is in no known state: closed, and a new one next time
            connections.pop(key, None)
            connection.close()
            if isinstance(e, (OSError, http.client.HTTPException)):  # refused, reset, timed out, cut short
                raise _Transient(f"{type(e).__name__}: {e}") from None
            raise
        status, location = response.status, response.getheader("Location")
        if status in (301, 302, 303, 307, 308) and location and hops < 5:
            return self.get(urllib.parse.urljoin(url, location), span, etag, hops + 1)
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} {response.reason}")
        if status == 404:
            raise FileNotFoundError(f"{url}: not found (HTTP 404)")
        if status in (401, 403):
            raise PermissionError(f"{url}: HTTP {status} {response.reason}: not readable with these credentials")
        if status == 412:
            raise ValueError(f"{url}: replaced since this map was opened (its ETag is no longer {etag}); "
                             "open the map again")
        if status != (200 if span is None else 206):
            raise ValueError(f"{url}: HTTP {status} {response.reason}")
        size = len(body) if span is None else _content_range(url, response.getheader("Content-Range"), span)
        return body, response.getheader("ETag"), size

    def _connections(self) -> dict:
        """This thread's open connections, by scheme and host."""
        if self._pid != os.getpid():  # a forked child: its parent's connections are not its own
            self._local, self._pid = threading.local(), os.getpid()
        return self._local.__dict__.setdefault("connections", {})

    @staticmethod
    def _connect(connections: dict, parts):
        import http.client
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connections[(parts.scheme, parts.netloc)] = kind(parts.netloc, timeout=REMOTE_TIMEOUT)
        return connections[(parts.scheme, parts.netloc)]


def _content_range(url: str, header: str | None, span: tuple) -> int:
    """The file's size from a 206's Content-Range, which must be the very range asked for."""
    found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", (header or "").strip())
    if not found or (int(found[1]), int(found[2]) + 1) != span:
        raise ValueError(f"{url}: asked for bytes {span[0]}-{span[1] - 1}, the server sent {header!r}")
    return int(found[3])


class _Fsspec:
    """GETs through fsspec (s3://, gs://, ...), imported when first used: a filesystem object per
    process, made in it (fsspec's clients are not fork-safe). Each file's size is read once a
    process and the json's checked against it; there is no ETag check here: a replaced object
    fails its pieces' digests instead."""

    def __init__(self, protocol: str):
        self._protocol, self._fs, self._pid, self._sizes = protocol, None, None, {}

    def get(self, url: str, span: tuple | None, etag: str | None) -> tuple[bytes, str | None, int | None]:
        try:
            fs = self._filesystem()
            if span is None:
                info = fs.info(url)
                if info["size"] > MAX_JSON_BYTES:
                    raise ValueError(f"{url}: more bytes than a picomap json may hold ({MAX_JSON_BYTES})")
                body = fs.cat_file(url)
                return body, info.get("ETag"), len(body)
            if url not in self._sizes:  # once a file and process: what its answers are checked against
                self._sizes[url] = fs.info(url)["size"]
            body = fs.cat_file(url, start=span[0], end=span[1])
        except (FileNotFoundError, PermissionError, ValueError, ImportError):
            raise
        except Exception as e:  # each backend raises its own types: all are tried again
            raise _Transient(f"{type(e).__name__}: {e}") from None
        if len(body) != span[1] - span[0]:
            raise ValueError(f"{url}: {len(body)} bytes where bytes {span[0]}-{span[1] - 1} were asked: "
                             "shorter than its map's json says")
        return body, None, self._sizes[url]

    def _filesystem(self):
        if self._pid != os.getpid():
            try:
                import fsspec
            except ImportError:
                raise ImportError(f"picomap: {self._protocol}:// URLs are read through fsspec: pip install fsspec "
                                  "and its backend (s3fs, gcsfs, ...)") from None
            self._fs, self._pid, self._sizes = fsspec.filesystem(self._protocol, skip_instance_cache=True), \
                os.getpid(), {}
        return self._fs


_SOURCES: dict = {}  # scheme -> its source, one per process and scheme
_POOL: list = [None, None]  # the pool that runs requests, and the process it belongs to


def _source(url: str):
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _SOURCES:
        _SOURCES[scheme] = _Http() if scheme in ("http", "https") else _Fsspec(scheme)
    return _SOURCES[scheme]


def _pool():
    import concurrent.futures
    if _POOL[1] != os.getpid():  # made in this process: a forked child has no thread of its parent's
        _POOL[:] = concurrent.futures.ThreadPoolExecutor(REMOTE_REQUESTS, "picomap-fetch"), os.getpid()
    return _POOL[0]


def _request(url: str, span: tuple | None, etag: str | None = None) -> tuple:
    """source.get, tried again after 0.1, 0.2, 0.4 s while it fails transiently."""
    for attempt in range(REMOTE_TRIES):
        try:
            return _source(url).get(url, span, etag)
        except _Transient as e:
            if attempt == REMOTE_TRIES - 1:
                what = "" if span is None else f" (bytes {span[0]}-{span[1] - 1})"
                raise ConnectionError(f"{url}{what}: {e}, {REMOTE_TRIES} tries") from None
            time.sleep(0.1 * 2**attempt)


class _ProcessLock:
    """A threading.Lock made anew in a forked child, where a thread of its parent may have held it."""

    def __init__(self):
        self._pid, self._lock = os.getpid(), threading.Lock()

    def __enter__(self):
        if self._pid != os.getpid():
            self._pid, self._lock = os.getpid(), threading.Lock()
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


class _Pieces:
    """One file of a remote map and its sparse copy in the cache. ``need(units)`` makes those units
    (its pieces; the .digests file's are blocks) whole in the copy and checked in this process:
    from the copy where they are whole, else fetched, runs of adjacent ones by one request each."""

    def __init__(self, url: str, path: Path, size: int, units: int, span: Callable, digest: Callable,
                 group: int = 1):
        self.url, self.path, self.size, self.units, self.group = url, path, size, units, group
        self.span, self.digest = span, digest  # unit -> (start, end) in the file; unit -> its xxh3_64
        self.fd = _sparse_file(path, size)
        self.mapping = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ) if size else None
        # a flag a unit, set once checked; past 65,536 units, pages the system gives as they are set
        self.ready = bytearray(units) if units <= 1 << 16 else mmap.mmap(-1, units)
        self.etag, self.lock = None, _ProcessLock()

    def need(self, units: Iterable[int]) -> None:
        ready, group = self.ready, self.group
        todo = sorted({k for k in units if not ready[k]})
        if not todo:
            return
        if group > 1:  # with its aligned group: small units are fetched many at a time
            todo = sorted({j for k in todo for j in range(k // group * group, min(k // group * group + group,
                                                                                  self.units))})
        with self.lock:  # (threads of one process fetch a piece once)
            expected = {k: self.digest(k) for k in todo if not ready[k]}
            missing = [k for k in expected if not self._whole_here(k, expected[k])]
            for attempt in range(2):  # a piece that does not match its digest is fetched once more
                missing = [k for bad in _pool().map(lambda run: self._fetch(run, expected), self._runs(missing))
                           for k in bad]
            if missing:
                a, b = self.span(missing[0])
                raise ValueError(f"{self.url}: bytes {a}-{b - 1} do not match their digest, fetched twice: the "
                                 "remote map is damaged or was replaced since it was opened")

    def _whole_here(self, k: int, expected: int) -> bool:
        start, end = self.span(k)
        with contextlib.suppress(OSError, AttributeError):  # no data there, or no SEEK_DATA: hash it
            if os.lseek(self.fd, start, os.SEEK_DATA) >= end:
                return False
        if xxhash.xxh3_64(self.mapping[start:end]).intdigest() != expected:
            return False
        self.ready[k] = 1
        return True

    def _runs(self, units: list) -> list:
        """Sorted units as runs [first, last] of adjacent ones, each of at most REMOTE_RUN_BYTES."""
        runs = []
        for k in units:
            if runs and k == runs[-1][1] + 1 and self.span(k)[1] - self.span(runs[-1][0])[0] <= REMOTE_RUN_BYTES:
                runs[-1][1] = k
            else:
                runs.append([k, k])
        return runs

    def _fetch(self, run: tuple, expected: dict) -> list:
        """Fetch units run[0]..run[1], write those that match their digests, return those that do not."""
        start, end = self.span(run[0])[0], self.span(run[1])[1]
        body, etag, size = _request(self.url, (start, end), self.etag)
        if size is not None and size != self.size:
            raise ValueError(f"{self.url}: {size} bytes, where its map's json makes {self.size}: not the file "
                             "that json describes")
        if etag and not etag.startswith("W/"):  # a weak tag may not be matched; the digests check all anyway
            self.etag = self.etag or etag
        bad = []
        for k in range(run[0], run[1] + 1):
            a, b = self.span(k)
            piece = memoryview(body)[a - start:b - start]
            if xxhash.xxh3_64(piece).intdigest() != expected[k]:
                bad.append(k)
                continue
            while len(piece):
                try:
                    written = os.pwrite(self.fd, piece, a)
                except OSError as e:
                    raise OSError(e.errno, f"{self.path}: cannot write fetched bytes {a}-{b - 1} into the cache "
                                  f"({e.strerror}); free space there or pass cache= another folder") from None
                piece, a = piece[written:], a + written
            self.ready[k] = 1
        return bad


def _pieces_of(spans: Iterable, piece: int) -> list:
    """The pieces (of piece bytes) that byte spans (start, end) of a file lie in, in span order."""
    return [k for start, end in spans for k in range(start // piece, -(-end // piece))]


def _url_base(url: str) -> str:
    """A map's URL without the suffix of one of its files, as map_files strips it from a path."""
    return next((url[:-len(suffix)] for suffix in _SUFFIXES if url.endswith(suffix)), url)


def _sparse_file(path: Path, size: int) -> int:
    """path opened for reading and writing, size bytes long: made sparse if missing (or replaced,
    by a rename, if it has another size); another process may be making it at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    found = os.fstat(fd).st_size
    if found not in (0, size):  # never written by picomap for this hash: replaced whole
        os.close(fd)
        temp = _sibling(path, secrets.token_hex(6), "tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        os.replace(temp, path)
    try:
        os.ftruncate(fd, size)  # the same size again changes nothing a racing process wrote
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"{path}: cannot make a cache file of {size} bytes ({e.strerror})") from None
    return fd


class _Remote:
    """A remote map's three fetched files, and the one thing a loader asks of them: make these rows
    (``rows``), these offsets (``offsets``) or everything (``everything``) whole in the cache."""

    def __init__(self, url: str, header: _MapJson, cache: Path, cache_bytes: int | None):
        self.url, self.cache, self.cache_bytes, self.cold = url, cache, cache_bytes, True
        piece, blocks = header.piece_bytes, [int(d, 16) for d in header.block_digests + header.starts_block_digests]
        # keyed by the hash and the digests that every cached byte is checked with: another map that
        # claims the hash, with digests of other bytes, never writes into this one's files
        key = json.dumps([piece, header.block_bytes, header.starts_block_bytes, blocks]).encode()
        key = xxhash.xxh3_64(key).hexdigest()
        folder, name = cache / f"{header.hash}-{key}", url.rsplit("/", 1)[-1]
        self.files = map_files(folder / name)
        if cache_bytes is not None:  # a .dat of its own, whose pieces come and go: an uncapped loader's never do
            self.files = self.files._replace(dat=folder / "capped" / f"{name}.dat")
        sizes = header.total_rows * header.row_bytes, len(_npy_header(header.count)) + 8 * (header.count + 1)
        _check_digests(self.files, header, *sizes)  # before any file is made: they fit these sizes
        counts = [-(-size // piece) for size in sizes]  # pieces of the .dat and of the offsets
        per_block = header.block_bytes // piece, header.starts_block_bytes // piece
        self.header_bytes, self.piece = sizes[1] - 8 * (header.count + 1), piece

        def digests_span(k: int) -> tuple:  # block k of the .digests file: the .dat's blocks, then the offsets'
            part = int(k >= len(header.block_digests))
            first = k - part * len(header.block_digests)
            return (8 * (part * counts[0] + min(first * per_block[part], counts[part])),
                    8 * (part * counts[0] + min((first + 1) * per_block[part], counts[part])))

        # the .digests file is tiny (8 bytes a MiB): fetched 64 KiB at a time, not a block of 8 bytes
        group = max(1, (1 << 16) // (8 * max(per_block)))
        self.digests = _Pieces(url + ".digests", self.files.digests, 8 * sum(counts), len(blocks), digests_span,
                               blocks.__getitem__, group)
        self.dat, self.starts = (_Pieces(url + suffix, path, size, count, self._piece_span(size),
                                         self._piece_digest(part * counts[0], part * len(header.block_digests),
                                                            per_block[part]))
                                 for part, (suffix, path, size, count) in enumerate(zip(
                                     (".dat", ".starts.npy"), self.files[:2], sizes, counts)))
        self.cap = None if cache_bytes is None else _Cap(self.dat, piece, cache_bytes,
                                                         folder / "capped" / f"{name}.evictions")

    def _piece_span(self, size: int) -> Callable:
        return lambda k: (k * self.piece, min((k + 1) * self.piece, size))

    def _piece_digest(self, first_digest: int, first_block: int, per_block: int) -> Callable:
        def digest(k: int) -> int:  # read from the .digests file, once its block is checked
            self.digests.need([first_block + k // per_block])
            return struct.unpack_from("<Q", self.digests.mapping, 8 * (first_digest + k))[0]
        return digest

    def rows(self, spans: list) -> None:
        """Make these byte spans (start, end) of the .dat whole in the cache."""
        units, ready = _pieces_of(spans, self.piece), self.dat.ready
        if not all(ready[k] for k in units):
            self.dat.need(units)

    def offsets(self, spans: Iterable) -> None:
        """Make the offsets of these spans (first, end) of item indices whole in the cache."""
        at = self.header_bytes
        self.starts.need(_pieces_of([(at + 8 * first, at + 8 * end) for first, end in spans], self.piece))

    def everything(self, bar: tqdm | None = None) -> None:
        """Make all of the map's files whole in the cache, a few requests' worth at a time."""
        step = REMOTE_REQUESTS * REMOTE_RUN_BYTES // self.piece
        for pieces in (self.starts, self.dat):
            for first in range(0, pieces.units, step):
                pieces.need(range(first, min(first + step, pieces.units)))
                if bar is not None:
                    bar.update(pieces.span(min(first + step, pieces.units) - 1)[1] - pieces.span(first)[0])


class _Cap:
    """A remote map's cache held to ``limit`` bytes of items (its .dat; offsets are kept as fetched).
    Items are then served as copies, made while the pieces they come from are held: a process holds
    a shared lock (an open file description's, so per loader, not per process) on their bytes of
    NAME.evictions, and punches a piece out of the .dat only once it locks that piece exclusively,
    then counts the eviction there. A piece checked before and evicted since has another count:
    it is checked again. Locks go with the process that holds them: none is left to hang anyone."""

    def __init__(self, pieces: _Pieces, piece: int, limit: int, path: Path):
        if not hasattr(fcntl, "F_OFD_SETLK") or not sys.platform.startswith("linux"):
            raise ValueError("picomap: cache_bytes= needs Linux (open file description locks, hole punching)")
        self.pieces, self.piece, self.limit, self.path = pieces, piece, limit, path
        self.fd = _sparse_file(path, 8 * max(pieces.units, 1))
        self.counts = mmap.mmap(self.fd, 8 * max(pieces.units, 1))
        self.seen: dict = {}  # piece -> its count when this process checked it, least recently used first
        self.lock, self.local = _ProcessLock(), threading.local()

    @contextlib.contextmanager
    def held(self, spans: list):
        """Hold the pieces of these byte spans of the .dat, whole, while the block runs; then evict."""
        # locks of one description merge: each thread (and, after a fork, each process) holds through
        # a description of its own, and evicts through another
        if getattr(self.local, "pid", None) != os.getpid():
            self.local.holds, self.local.evicting = os.open(self.path, os.O_RDWR), os.open(self.path, os.O_RDWR)
            self.local.pid = os.getpid()
        ready, holds = self.pieces.ready, self.local.holds
        units = sorted(set(_pieces_of(spans, self.piece)))
        _range_lock(holds, fcntl.F_RDLCK, 8 * units[0], 8 * (units[-1] + 1 - units[0]))
        try:
            for k in units:
                if ready[k] and self._count(k) != self.seen.get(k):  # evicted since: maybe fetched again since
                    ready[k] = 0
            self.pieces.need(units)
            with self.lock:
                for k in units:
                    self.seen.pop(k, None)
                    self.seen[k] = self._count(k)
            yield
        finally:
            _range_lock(holds, fcntl.F_UNLCK, 8 * units[0], 8 * (units[-1] + 1 - units[0]))
        with self.lock:
            self._evict()

    def _count(self, k: int) -> int:
        return struct.unpack_from("<Q", self.counts, 8 * k)[0]

    def _evict(self) -> None:
        """While over the limit, punch out pieces no loader holds: this process's least recently used
        first, then any other process's. Forget the oldest counts past twice the limit's pieces."""
        over = os.fstat(self.pieces.fd).st_blocks * 512 - self.limit
        remembered = 2 * (self.limit // self.piece + 1)  # memory stays bounded whatever the map's size
        for k in list(self.seen):
            if over <= 0 and len(self.seen) <= remembered:
                return
            del self.seen[k]
            self.pieces.ready[k] = 0
            over -= self._punched(k) if over > 0 else 0
        at = 0
        while over > 0 and at < self.pieces.size:
            try:  # the next piece that holds data
                k = os.lseek(self.pieces.fd, at, os.SEEK_DATA) // self.piece
            except OSError:  # none left
                return
            over -= self._punched(k)
            at = (k + 1) * self.piece

    def _punched(self, k: int) -> int:
        """Count piece k as evicted, then punch it out of the .dat, unless a loader holds it; the bytes
        freed. (Counted first: a process killed in between leaves a piece checked again for nothing.)"""
        if not _range_lock(self.local.evicting, fcntl.F_WRLCK, 8 * k, 8, wait=False):
            return 0
        try:
            start, end = self.pieces.span(k)
            struct.pack_into("<Q", self.counts, 8 * k, self._count(k) + 1)
            _punch_hole(self.pieces.fd, start, end - start)
            return end - start
        finally:
            _range_lock(self.local.evicting, fcntl.F_UNLCK, 8 * k, 8)


def _range_lock(fd: int, kind: int, start: int, length: int, wait: bool = True) -> bool:
    """Lock (or unlock) bytes of a file for this open file description; False if another holds them."""
    request = struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
        return True
    except OSError as e:
        if wait or e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


def _punch_hole(fd: int, start: int, length: int) -> None:
    import ctypes
    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, 3, start, length) != 0:  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        code = ctypes.get_errno()
        raise OSError(code, f"cannot punch a piece out of the cache ({os.strerror(code)}); its file system "
                      "does not free parts of files: use cache_bytes=None or a cache on another file system")


def _open_remote(url: str, cache: str | os.PathLike | None, cache_bytes: int | None = None) -> _Map | _Set:
    """Open the map or set at url: its json fetched, then, for each map, both ends of its offsets."""
    base = _url_base(url)
    cache = _default_cache() if cache is None else Path(cache)
    if cache_bytes is not None and not (_is_count(cache_bytes) and cache_bytes > 0):
        raise ValueError(f"{url}: cache_bytes must be a positive integer or None, not {cache_bytes!r}")
    raw = _parse_json(base + ".json", _request(base + ".json", None)[0])
    if "fields" not in raw:
        return _open_remote_map(base, _read_map_json(base + ".json", raw), cache, cache_bytes)
    header = _read_set_json(base + ".json", raw)
    fields = {}
    for name, digest in header.fields.items():
        field_url = f"{base}.fields/{header.build}/{name}"
        raw = _parse_json(field_url + ".json", _request(field_url + ".json", None)[0])
        fields[name] = _open_remote_map(field_url, _read_map_json(field_url + ".json", raw), cache, cache_bytes)
        _check_field(base + ".json", header, name, digest, fields[name])
    return _Set(map_files(cache / header.hash / base.rsplit("/", 1)[-1]), header, fields)


def _open_remote_map(url: str, header: _MapJson, cache: Path, cache_bytes: int | None) -> _Map:
    if header.starts_block_digests is None:
        raise ValueError(f"{url}.json: written before picomap 1.4, without the digests of its pieces that a "
                         "remote map is read with; rewrite it (picomap merge OLD NEW) and upload NEW's files")
    # what a fetch of one piece, or of one block's digests, may cost: what picomap writes, bounded
    if header.piece_bytes != PIECE_BYTES or max(header.block_bytes, header.starts_block_bytes) > PIECE_BYTES << 17:
        raise ValueError(f"{url}.json: pieces of {header.piece_bytes} bytes in blocks of {header.block_bytes} and "
                         f"{header.starts_block_bytes}; a remote map is read in pieces of {PIECE_BYTES} in blocks of "
                         f"at most {PIECE_BYTES << 17} (a map of at most 128 TiB)")
    remote = _Remote(url, header, cache, cache_bytes)
    remote.offsets([(0, 1), (header.count, header.count + 1)])  # the ends, checked as a local open does
    return _open_map_files(remote.files, header, follow=True)._replace(remote=remote)


# ---------------------------------------------------------------- commit

# How a build becomes the map at its path (README, "How a build is committed"). A build writes its
# files as temporaries, .NAME.dat.TAG.tmp etc. (a set: its json, and its fields in NAME.fields/TAG),
# holding an flock on one of them, its claim, while it lives. Then, holding the folder's lock:
#   1. each file it replaces is hard-linked to a backup, .NAME.dat.TAG.old etc. (or, where it may
#      not be linked, renamed there in step 3, just before its replacement);
#   2. an intent, .NAME.json.commit, names the build, its files, those that had a predecessor and
#      the temporaries' inodes; it is fsynced with the folder;
#   3. the temporaries are renamed into place, json last, and the folder fsynced: committed;
#   4. the intent, then the backups, are deleted (as best it can: a leftover is finished again).
# A failure in 3 marks the commit as going back (an empty .NAME.json.TAG.back) and puts the backups
# back: the old map. Whoever opens or builds the map next and finds an intent finishes it under the
# lock: forward, renaming what is left, or back if it was going back or going forward fails. Both
# ways can be run again and again: a file is renamed only from where the intent says it was, and
# one is removed only if it is the build's own by its inode.


class _Staging:
    """One build's temporaries beside the map at ``files`` (and, for a set, its field folder): the
    writers fill ``temps`` (or ``folder``), ``commit()`` puts them in place, ``discard()`` removes
    them. Whatever map was at ``files`` is untouched until the commit, and replaced at once by it."""

    def __init__(self, files: MapFiles, is_set: bool):
        self.files, self.tag, self.is_set = files, secrets.token_hex(6), is_set
        self.temps = MapFiles(*(_sibling(p, self.tag, "tmp") for p in files))
        self.folder = _fields_folder(files) / self.tag if is_set else None  # the set's field maps
        self.made, self.claim, self.state = [], None, "writing"  # then "committing", "committed"
        try:
            for attempt in range(2):  # again if a failed build removed the folder it had made meanwhile
                self.made += _make_folders(files.json.parent)
                try:
                    # with the folder locked, no other build is committing, cleaning up or making its claim
                    with _folder_lock(files.json.parent, exclusive=True) as folder_fd:
                        _recover(files, folder_fd)
                        _remove_abandoned(files)
                        self.claim = _claim(self.temps.json if is_set else self.temps.dat)
                    break
                except FileNotFoundError:
                    if attempt or files.json.parent.is_dir():
                        raise
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Put the written temporaries in place: the json's rename is the moment the new map appears."""
        parts = [2] if self.is_set else [0, 1, 3, 2]  # the json last
        try:
            if self.is_set:  # the field maps' files were fsynced; now their names
                _fsync_folder(self.folder)
                _fsync_folder(self.folder.parent)
        except BaseException:
            self.discard()
            raise
        with _folder_lock(self.files.json.parent, exclusive=True) as folder_fd:
            try:
                _recover(self.files, folder_fd)  # another build's, killed in the middle of its commit
                record = self._intend(parts, folder_fd)  # 1. and 2.
            except BaseException:
                # (the lock is held: an intent there now is this build's; it goes first, for good)
                if self.state != "committing" or _unlink_for_good(_intent(self.files), folder_fd):
                    self.state = "writing"
                    self.discard()
                raise
            error = _finish_commit(self.files, record, folder_fd)  # 3. (raises if it cannot even go back)
            if error is not None:  # gone back: the old map is in place
                if not os.path.lexists(_intent(self.files)):  # (else its files are the next open's)
                    self.state = "writing"
                    self.discard()
                raise error
            self.state = "committed"
            _forget_commit(self.files, record, folder_fd)  # 4.
            with contextlib.suppress(OSError):
                self._remove_replaced()
        self._release()

    def _intend(self, parts: list, folder_fd: int | None) -> dict:
        """Steps 1 and 2: the backups and the intent, fsynced; returns what the intent says."""
        for k in parts:
            if not os.path.lexists(self.temps[k]):  # only ever by hand: a live build's files are kept
                raise FileNotFoundError(f"{self.temps[k]}: this build's file was removed; nothing was changed")
        had = [k for k in parts if os.path.lexists(self.files[k])]
        moved = []  # backed up by a rename in step 3 instead: files that may not be hard-linked
        for k in had:
            try:
                os.link(self.files[k], _sibling(self.files[k], self.tag, "old"))
            except OSError as e:  # another user's file under protected_hardlinks; FAT, exFAT
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                moved.append(k)
        record = {"build": self.tag, "files": parts, "had": had, "moved": moved,
                  "inodes": [list(_inode(self.temps[k])) for k in parts]}
        # at the top, the commit of the three files picomap 1.3 knows, which it finishes (leaving at
        # worst a .digests file that fails verify_hash); this picomap reads the whole record, "all"
        known = [n for n, k in enumerate(parts) if k != 3]
        shown = {"build": self.tag, "files": [parts[n] for n in known], "had": [k for k in had if k != 3],
                 "moved": [k for k in moved if k != 3], "inodes": [record["inodes"][n] for n in known], "all": record}
        self.state = "committing"
        with _new_file(_intent(self.files)) as handle:
            handle.write(json.dumps(shown).encode())
        _fsync(folder_fd)
        return record

    def _remove_replaced(self) -> None:
        """With the folder locked, delete what the map now at files no longer uses: a plain map's
        .dat and offsets if a set replaced it, and the field folders of every other build that is
        not alive (the one replaced, and those of builds killed after committing)."""
        if self.is_set:
            for stale in (self.files.dat, self.files.starts, self.files.digests):
                with contextlib.suppress(OSError):
                    os.unlink(stale)
        folder = _fields_folder(self.files)
        if fcntl is None or not folder.is_dir() or folder.is_symlink():  # never clean up through a link
            return
        live = _live_tags(self.files)[0]
        for build in folder.iterdir():  # only what a build writes: never a user's own folder
            if build.name != self.tag and build.name not in live and _is_build_folder(build):
                shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(OSError):  # gone if empty, as when a plain map replaced a set
            folder.rmdir()

    def discard(self) -> None:
        """Remove this build's temporaries, and the folders it made; a map in place stays as it was.
        Once its commit has begun, the files are the commit's: then it only lets go of its claim."""
        if self.claim is not None and self.state == "writing":
            for own in [*self.temps, *(_sibling(final, self.tag, "old") for final in self.files)]:
                with contextlib.suppress(OSError):
                    os.unlink(own)
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # NAME.fields, if this build made it and nothing else is in it
                    self.folder.parent.rmdir()
        if self.state == "writing":
            for folder in self.made:  # deepest first; only if empty: another build may be using it
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self.made = []
        self._release()

    def _release(self) -> None:
        if self.claim is not None:
            os.close(self.claim)
            self.claim = None


def _sibling(final: Path, tag: str, kind: str) -> Path:
    """A build's own file beside a map's file: .NAME.dat.TAG.tmp (a temporary), .old (a backup), .back."""
    return final.with_name(f".{final.name}.{tag}.{kind}")


def _intent(files: MapFiles) -> Path:
    return files.json.with_name(f".{files.json.name}.commit")


def _inode(path: Path, follow: bool = False) -> tuple:
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None, None
    return info.st_dev, info.st_ino


def _finish_commit(files: MapFiles, record: dict, folder_fd: int | None) -> BaseException | None:
    """Step 3 of a commit whose intent is written: forward, or back if it was going back or going
    forward fails. Returns None once forward (committed), else the error that sent it back."""
    tag, parts, inodes = record["build"], record["files"], [tuple(i) for i in record["inodes"]]
    going_back, error = _sibling(files.json, tag, "back"), None
    if not os.path.lexists(going_back):
        try:
            for k, inode in zip(parts, inodes):
                temp, old = _sibling(files[k], tag, "tmp"), _sibling(files[k], tag, "old")
                if os.path.lexists(temp):
                    if k in record.get("moved", ()) and not os.path.lexists(old):
                        os.replace(files[k], old)
                    os.replace(temp, files[k])
                elif _inode(files[k]) != inode:  # neither in place nor where it was
                    raise FileNotFoundError(f"{temp}: missing, so the commit of build {tag} goes back")
            _fsync(folder_fd)
            return None
        except BaseException as e:  # Ctrl-C too: the old map is put back before it goes on
            error = e
            with _new_file(going_back):
                pass
            _fsync(folder_fd)
    _roll_back(files, record, folder_fd)
    _forget_commit(files, record, folder_fd)
    return error or ValueError(f"{_intent(files)}: the commit of build {tag} went back")


def _roll_back(files: MapFiles, record: dict, folder_fd: int | None) -> None:
    """Put back what the commit replaced, and remove what it put where nothing was."""
    tag, parts, inodes = record["build"], record["files"], [tuple(i) for i in record["inodes"]]
    for k, inode in zip(parts, inodes):
        old = _sibling(files[k], tag, "old")
        if k in record["had"]:
            if os.path.lexists(old) and _inode(old) != _inode(files[k]):
                os.replace(old, files[k])
        elif _inode(files[k]) == inode:  # this build's own file, where none was before
            os.unlink(files[k])
    _fsync(folder_fd)


def _forget_commit(files: MapFiles, record: dict, folder_fd: int | None) -> None:
    """Step 4: the intent first, for good (the commit is over), then what it kept, its mark of
    going back last. As best it can: while the intent may remain, nothing it names is touched, so
    that the next open finishes the commit the same way; other leftovers a later build removes."""
    if not _unlink_for_good(_intent(files), folder_fd):
        return
    tag = record["build"]
    for path in [_sibling(files[k], tag, kind) for k in record["files"] for kind in ("old", "tmp")] + [
            _sibling(files.json, tag, "back")]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _unlink_for_good(path: Path, folder_fd: int | None) -> bool:
    """Remove path and fsync its folder; False if either failed (then it may still be there)."""
    try:
        os.unlink(path)
        _fsync(folder_fd)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _recover(files: MapFiles, folder_fd: int | None) -> None:
    """Finish a commit that a crash or an error interrupted (its intent is still there); the
    caller holds the folder's lock. ValueError naming the intent if it cannot be finished here."""
    intent = _intent(files)
    if not os.path.lexists(intent):
        return
    try:
        with _regular_file(intent) as handle:
            text = handle.read(1 << 16)
    except FileNotFoundError:
        return
    except ValueError:
        raise ValueError(f"{intent}: not a commit intent picomap wrote (a folder, a FIFO or a device); "
                         "remove it to open or build this map") from None
    record = _intent_record(text)
    try:
        if record is None:  # cut short while it was written: no file had been renamed yet
            os.unlink(intent)
        elif _finish_commit(files, record, folder_fd) is None:  # (going back, it forgets itself)
            _forget_commit(files, record, folder_fd)
        if os.path.lexists(intent):
            raise OSError(errno.EIO, "its intent could not be removed")
    except OSError as e:
        raise ValueError(f"{intent}: a commit of this map was interrupted and cannot be finished here ({e}); "
                         "open the map once where its folder can be written") from None


def _intent_record(text: bytes) -> dict | None:
    """An intent's record, checked; None if it is not one picomap wrote whole."""
    try:
        record = json.loads(text)
        record = record.get("all", record)
        parts, had, inodes = record["files"], record["had"], record["inodes"]
        if _is_hex(record["build"], 12) and parts in ([2], [0, 1, 3, 2], [0, 1, 2]) and set(had) <= set(parts) and \
                set(record.get("moved", [])) <= set(had) and \
                len(inodes) == len(parts) and all(len(i) == 2 and all(map(_is_count, i)) for i in inodes):
            return record
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


def _make_folders(folder: Path) -> list[Path]:
    """Make folder and its missing parents; return those it made, deepest first."""
    missing, at, made = [], folder, []
    while not at.is_dir():
        if os.path.lexists(at) and not at.is_dir():  # a file, a FIFO or a broken link (not a folder made meanwhile)
            raise ValueError(f"{at}: not a folder, where the map's folder {folder} should be")
        missing.append(at)
        at = at.parent
    try:
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another build made it meanwhile
                new.mkdir()
                made.insert(0, new)
    except OSError as e:
        for new in made:
            with contextlib.suppress(OSError):
                new.rmdir()
        _raise_if_read_only(e, new.parent)
        raise
    return made


def _claim(path: Path) -> int:
    """Create path (a new temporary name) and hold an exclusive flock on it while this process lives."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        _raise_if_read_only(e, path.parent)
        raise
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _raise_if_read_only(error: OSError, folder: Path) -> None:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise PermissionError(error.errno, f"{folder}: cannot create files there (read-only?); "
                              "nothing was changed") from None


def _is_held(path: Path) -> bool:
    """Whether some process holds a flock on path (its build is alive), or it cannot be told (a file
    this process may not read): then it is kept. Never blocks, even on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _live_tags(files: MapFiles) -> tuple[set, dict]:
    """The tags of the builds of this map that are alive, and the regular files of the abandoned
    ones (a SIGKILL, a power cut) by tag: (live, abandoned). Anything else is left alone."""
    found: dict[str, list[Path]] = {}
    for final in files:
        for path in files.dat.parent.glob(f".{glob.escape(final.name)}.*.*"):
            tag, kind = path.name[len(final.name) + 2:].rsplit(".", 1)
            if _is_hex(tag, 12) and kind in ("tmp", "old", "back") and path.is_file() and not path.is_symlink():
                found.setdefault(tag, []).append(path)
    live = {tag for tag, paths in found.items() if any(_is_held(p) for p in paths)}
    return live, {tag: found[tag] for tag in found.keys() - live}


def _remove_abandoned(files: MapFiles) -> None:
    """Delete the files of builds of this map whose process is gone (the caller holds the folder's
    lock, and finished any commit first). A set's abandoned field folders go at its next commit."""
    if fcntl is None:  # no way to tell a live build from a dead one
        return
    for paths in _live_tags(files)[1].values():
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _is_build_folder(path: Path) -> bool:
    """A set's build folder as picomap writes it: 12 hex digits, holding only field maps' files."""
    return _is_hex(path.name, 12) and path.is_dir() and not path.is_symlink() and all(
        entry.is_file() and not entry.is_symlink() and entry.name.endswith(_SUFFIXES) for entry in path.iterdir())


@contextlib.contextmanager
def _new_file(path: Path, mode: str = "xb"):
    """Yield a new file at path, open for writing; then fsync and close it."""
    with open(path, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(fd: int | None) -> None:
    if fd is not None:  # None: where the folder could not be opened (then its lock is missing too)
        os.fsync(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, header: dict) -> None:
    """The one place a json is written: a map's, a field's or a set's, into its temporary or build folder."""
    with _new_file(path, "wb") as handle:  # (a set's temporary json is its claim: it exists already)
        handle.write(json.dumps(header).encode())


# ---------------------------------------------------------------- writing

def _tensor_as_array(index: int, tensor) -> np.ndarray:
    """A CPU torch tensor's values as numpy sees them; bfloat16 and float8 through ml_dtypes."""
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu":
        raise TypeError(f"item {index}: a torch tensor on {tensor.device}; pass tensor.cpu()")
    tensor = tensor.detach().resolve_conj().resolve_neg()
    try:
        return tensor.numpy()
    except TypeError:  # a dtype numpy has only through ml_dtypes
        pass
    name = str(tensor.dtype).removeprefix("torch.")
    ml_dtypes = _import_ml_dtypes(f"item {index}: torch.{name}", TypeError)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(tensor.element_size())
    if not hasattr(ml_dtypes, name) or bits is None:
        raise TypeError(f"item {index}: torch.{name} has no numpy dtype picomap can store")
    return tensor.view(bits).numpy().view(getattr(ml_dtypes, name))


def _as_array(index: int, item) -> np.ndarray:
    torch = sys.modules.get("torch")  # an item can only be a tensor if torch is imported already
    if torch is not None and isinstance(item, torch.Tensor):
        return _tensor_as_array(index, item)
    try:
        return np.asarray(item)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"item {index}: not an array ({e})") from None


# ---- dtype=: the one conversion check. A value is stored only if it is the same value in the
# target type: integers exactly, floats rounded to the nearest (never overflowing to infinity
# nor clipped to the largest finite value), a complex number only with a zero imaginary part
# where the target is real, datetimes and timedeltas exactly, NaN as NaN, NaT as NaT. Numbers
# convert among themselves (bool as 0 and 1), times among the same kind of time, strings among
# strings, records field by field when both have the same field names in order; nothing else.

_TIME_UNITS = {"as": 1, "fs": 10**3, "ps": 10**6, "ns": 10**9, "us": 10**12, "ms": 10**15, "s": 10**18,
               "m": 60 * 10**18, "h": 3600 * 10**18, "D": 86400 * 10**18, "W": 7 * 86400 * 10**18}
_INT64_MIN = -2**63  # numpy's NaT


def _number_kind(dtype: np.dtype) -> str | None:
    """"bool", "int", "float" or "complex" for the numbers picomap converts (numpy's and ml_dtypes'
    own, which numpy calls void), None for anything else."""
    if dtype.kind in "biufc":
        return {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}[dtype.kind]
    if dtype.kind == "V" and dtype.fields is None and dtype.subdtype is None:
        name = str(dtype)
        if re.fullmatch(r"u?int[124]", name):
            return "int"
        if name.startswith(("bfloat", "float")):
            return "float"
    return None


def _number_info(dtype: np.dtype, integer: bool):
    """np.iinfo or np.finfo, through ml_dtypes for its types (already imported when they exist)."""
    with contextlib.suppress(ValueError, TypeError):
        return np.iinfo(dtype) if integer else np.finfo(dtype)
    ml_dtypes = sys.modules["ml_dtypes"]
    return ml_dtypes.iinfo(dtype) if integer else ml_dtypes.finfo(dtype)


def _wide(dtype: np.dtype) -> type:
    """The float type every value of a real dtype converts to exactly: float64, or longdouble for longdouble."""
    return np.longdouble if dtype.kind in "fc" and dtype.itemsize > (16 if dtype.kind == "c" else 8) else np.float64


def _misfits(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A boolean mask of arr's values that ``arr.astype(dtype)`` would change (see above).
    ValueError for a pair of dtypes picomap does not convert at all."""
    source, target = _number_kind(arr.dtype), _number_kind(dtype)
    if source is not None and target is not None:
        return _number_misfits(arr, source, dtype, target)
    if arr.dtype.kind in "Mm" and dtype.kind == arr.dtype.kind:
        return _time_misfits(arr, dtype)
    if arr.dtype.kind in "SU" and dtype.kind in "SU":
        back = arr.astype(dtype).astype(arr.dtype)  # UnicodeEncodeError (a ValueError) for non-ASCII to bytes
        return back != arr
    if arr.dtype.names is not None and dtype.names is not None and arr.dtype.names == dtype.names:
        bad = np.zeros(arr.shape, bool)
        for name in dtype.names:
            field = _misfits(arr[name], dtype.fields[name][0].base)  # a field of shape (k,) adds axes
            bad |= field.reshape(*arr.shape, -1).any(axis=-1)
        return bad
    raise ValueError("picomap converts numbers to numbers, datetimes and timedeltas to their own kind in "
                     "another unit, strings to strings, and records to records of the same field names")


def _number_misfits(arr: np.ndarray, source: str, dtype: np.dtype, target: str) -> np.ndarray:
    if source == "complex":
        real, imag = arr.real, arr.imag
        if target == "complex":
            part = np.empty(0, dtype).real.dtype
            return _real_misfits(real, part) | _real_misfits(imag, part)
        return (imag != 0) | _real_misfits(real, dtype)  # a NaN imaginary part is not zero either
    if source == "int" and arr.dtype.kind == "V":
        arr = _small_int(arr)
    if target == "complex":
        return _real_misfits(arr, np.empty(0, dtype).real.dtype)
    return _real_misfits(arr, dtype)


def _real_misfits(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """For a real (bool, integer or float) arr and a real dtype."""
    if _number_kind(dtype) == "float":
        return _float_misfits(arr, dtype)
    if _number_kind(arr.dtype) == "float":  # to an integer: integral, and in range
        x = arr.astype(_wide(arr.dtype))
        low, high = (0, 2) if dtype.kind == "b" else (int(_number_info(dtype, True).min),
                                                       int(_number_info(dtype, True).max) + 1)
        # low and high are 0 or powers of two: exact as floats, so both comparisons are exact
        return ~np.isfinite(x) | (x != np.floor(x)) | (x < x.dtype.type(low)) | (x >= x.dtype.type(high))
    out = arr.astype(dtype)  # integer (or bool) to integer: wraps, which going back and the sign both see
    if out.dtype.kind == "V":
        out = _small_int(out)
    return (out.astype(arr.dtype) != arr) | ((out < 0) != (arr < 0))


def _small_int(arr: np.ndarray) -> np.ndarray:
    """ml_dtypes' int2/int4 (or uint) values as int8 (uint8), which hold them exactly."""
    return arr.astype(np.int8 if str(arr.dtype).startswith("int") else np.uint8)


def _float_misfits(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """For a real arr and a float dtype: rounding is what a float target is for; overflowing,
    clipping to the largest finite value (ml_dtypes' types without infinity do), or losing a NaN
    or an infinity is not."""
    wide = _wide(dtype) if _wide(dtype) is np.longdouble else _wide(arr.dtype)
    x, info = arr.astype(wide), _number_info(dtype, False)
    out = arr.astype(dtype).astype(wide)
    too_big = False
    if math.isfinite(float(info.max)):  # (for a longdouble target nothing is too big)
        # A value rounds to the largest finite one up to halfway to the step after it; the halfway
        # point itself does only if the largest's last mantissa bit is even (ties round to even).
        mantissa, exponent = math.frexp(float(info.max))
        step = math.ldexp(1.0, exponent - 1 - int(info.nmant))  # the gap below the largest value
        halfway = wide(float(info.max)) + wide(step) / 2  # exact in wide, or inf beyond float64's range
        largest_is_even = int(mantissa * 2 ** (int(info.nmant) + 1)) % 2 == 0
        magnitude = np.abs(x)
        too_big = (magnitude > halfway) | ((magnitude == halfway) & (not largest_is_even))
    finite = np.isfinite(x)
    return (finite & (too_big | ~np.isfinite(out))) | (np.isnan(x) != np.isnan(out)) | (np.isinf(x) & (out != x))


def _time_misfits(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """For datetimes (or timedeltas) to another unit: exactly, NaT as NaT. Years and months are
    not a fixed number of days: a datetime converts between them and days through the calendar,
    a timedelta does not."""
    (unit, count), (to_unit, to_count) = np.datetime_data(arr.dtype), np.datetime_data(dtype)
    ticks = _ticks(arr)
    nat = ticks == _INT64_MIN
    if "generic" in (unit, to_unit):
        if to_unit == "generic":
            raise ValueError("picomap does not convert to a datetime64 of no unit")
        return ~nat  # a unitless array holds NaT only
    calendar = {"Y": 12, "M": 1}
    if (unit in calendar) != (to_unit in calendar):
        if arr.dtype.kind == "m":
            raise ValueError("a timedelta of years or months has no exact length in days or seconds")
        if unit in calendar:  # months to days: through the calendar, exact; then days to the unit
            in_range = np.abs(np.where(nat, 0, ticks)) <= 2**58 // (calendar[unit] * count)
            days = np.where(in_range, arr, np.datetime64("NaT")).astype("M8[D]")
            return (~nat & ~in_range) | _time_misfits(days, dtype)
        out = arr.astype(dtype)  # to months: coarser, so it cannot overflow; exact if it goes back
        return (out.astype(arr.dtype) != arr) & ~nat
    ratio = Fraction(calendar[unit] * count, calendar[to_unit] * to_count) if unit in calendar else \
        _unit_ratio(arr.dtype, dtype)
    p, q = ratio.numerator, ratio.denominator
    # exact if a whole number of the new units, and in int64's range (whose lowest value is NaT)
    if q > 2**62:  # (attoseconds to days, say) no int64 but 0 is a whole number of the new units
        return ~nat & (ticks != 0)
    return ~nat & ((ticks % q != 0) | (np.abs(np.where(nat, 0, ticks) // q) > (2**63 - 1) // p))


def _unit_ratio(source: np.dtype, target: np.dtype) -> Fraction:
    """How many of target's time units one of source's is, for units of a fixed length."""
    (unit, count), (to_unit, to_count) = np.datetime_data(source), np.datetime_data(target)
    return Fraction(_TIME_UNITS[unit] * count, _TIME_UNITS[to_unit] * to_count)


def _ticks(arr: np.ndarray) -> np.ndarray:
    """A datetime or timedelta array's values as native int64s (whatever its byte order)."""
    return arr.astype(arr.dtype.newbyteorder("=")).view(np.int64)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """arr.astype(dtype), once _misfits found every value fits: a zero imaginary part dropped
    without numpy's warning, and times between fixed units scaled here, since numpy refuses
    pairs of units whose factor it cannot compute (days to picoseconds) even for NaT."""
    if arr.dtype.kind == "c" and _number_kind(dtype) not in ("complex", None):
        return arr.real.astype(dtype)
    units = {np.datetime_data(arr.dtype)[0], np.datetime_data(dtype)[0]} if arr.dtype.kind in "Mm" else {""}
    if units <= _TIME_UNITS.keys():
        ratio, ticks, native = _unit_ratio(arr.dtype, dtype), _ticks(arr), dtype.newbyteorder("=")
        if max(ratio.numerator, ratio.denominator) > 2**62:  # every value is 0 or NaT: _time_misfits checked it
            return ticks.copy().view(native).astype(dtype)
        scaled = ticks // ratio.denominator * ratio.numerator  # exact: _time_misfits checked it
        return np.where(ticks == _INT64_MIN, ticks, scaled).view(native).astype(dtype)
    return arr.astype(dtype)


def _shown(value) -> str:
    """A value for an error message: 65536, nan, (1+2j), numpy.datetime64('2300-01-01')."""
    if isinstance(value, (np.datetime64, np.timedelta64, np.void, np.str_, np.bytes_)):
        return repr(value)
    kind = _number_kind(np.asarray(value).dtype)
    if kind in ("int", "float") and np.asarray(value).dtype.kind == "V":  # ml_dtypes' numbers
        return repr(int(value) if kind == "int" else float(value))
    return repr(value.item() if isinstance(value, np.generic) else value)


def _converted(index: int, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """THE conversion check of dtype=: arr as dtype if every value is the same value there (the
    rules above), else ValueError naming the item and the first value that is not."""
    if arr.dtype == dtype:
        return arr
    with np.errstate(all="ignore"):
        try:
            bad = _misfits(arr, dtype)
            out = None if bad.any() else _cast(arr, dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"item {index}: {arr.dtype} values cannot become {dtype} ({e})") from None
    if out is None:
        raise ValueError(f"item {index}: the value {_shown(arr[bad].flat[0])} does not fit {dtype} "
                         "(picomap never wraps, clips or drops part of a value)")
    return out


def _bad_item(index: int, arr: np.ndarray, dtype: np.dtype, trail: tuple) -> Exception:
    if arr.dtype.hasobject:
        return TypeError(f"item {index}: dtype {arr.dtype} holds Python objects; picomap stores plain bytes only")
    if arr.ndim == 0:
        return ValueError(f"item {index}: a 0-d array; items need a first (ragged) dimension")
    if arr.dtype != dtype:
        return ValueError(f"item {index}: dtype {arr.dtype.str} but the map is {dtype.str} "
                          "(fixed by item 0; picomap never casts)")
    return ValueError(f"item {index}: trailing shape {arr.shape[1:]} (shape {arr.shape}) but the map's is "
                      f"{trail} (fixed by item 0)")




def _npy_header(count: int) -> bytes:
    """The .npy header np.save writes for ``count`` uint64 offsets: 128 bytes whatever the count,
    since numpy pads headers to a multiple of 64."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u8", "fortran_order": False, "shape": (count,)})
    return header.getvalue()


class _OffsetsFile:
    """Row offsets streamed into a .npy file open for writing and reading, so no process ever holds
    them all, its pieces digested as they go; the header, which holds their count, is written over
    its placeholder last, and piece 0, which holds it, read back and digested again."""

    def __init__(self, handle):
        self.handle, self.count, self.end, self.pieces = handle, 0, 0, _BlockDigests(PIECE_BYTES)
        self._write(_npy_header(0))
        self.append(np.zeros(1, np.int64))

    def append(self, offsets: np.ndarray) -> None:
        """Add offsets (int64, never decreasing, from self.end on)."""
        self._write(offsets.astype("<u8"))
        self.count, self.end = self.count + len(offsets), int(offsets[-1])

    def _write(self, data) -> None:
        data = memoryview(data).cast("B")
        self.handle.write(data)
        self.pieces.update(data)

    def finish(self) -> None:
        header, piece = _npy_header(self.count), self.pieces.piece_bytes
        self.handle.seek(0)
        self.handle.write(header)
        digests = self.pieces.pieces()
        for k in range(-(-len(header) // piece)):  # the pieces the header lies in, read back 64 KiB at a time
            self.handle.seek(k * piece)
            digest = xxhash.xxh3_64()
            for _ in range(0, piece, 1 << 16):
                digest.update(self.handle.read(min(1 << 16, (k + 1) * piece - self.handle.tell())))
            digests[k] = digest.intdigest()
        self.handle.seek(0, os.SEEK_END)


class _ItemWriter:
    """Streams items to a map's .dat and .starts.npy (at ``files``) in batches, hashing as it goes;
    ``finish`` writes its json. The one writing path: build_map, MapWriter, each field of a set and
    merge_maps (which feeds it whole maps) all write through it.

    Each item's bytes are copied into the batch when it is added, before the caller makes the next
    one: a source that refills one buffer for every item is stored as it yielded each item."""

    def __init__(self, files: MapFiles, dtype: np.dtype | None):
        self.files, self.dat = files, open(files.dat, "wb")
        self.starts = open(files.starts, "w+b")
        self.offsets = _OffsetsFile(self.starts)
        self.hash, self.blocks = xxhash.xxh3_128(_MAP_HEAD), _BlockDigests(PIECE_BYTES)
        self.target, self.dtype, self.trail = dtype, None, None  # target: what build_map's dtype= asks
        self.text = None  # "str" or "bytes" once item 0 was text
        self.batch, self.lengths = bytearray(), []  # the batch's bytes, C order, and first dimensions
        self.untyped_empties = 0  # empty lists met before any item fixed the dtype

    def add(self, index, item) -> None:
        if type(item) is np.ndarray and self.text is None:  # the common case, first
            arr = item
        elif self.text is not None or isinstance(item, (str, bytes)):
            arr = self._text_bytes(index, item)
        elif isinstance(item, (list, tuple)) and not item:  # numpy calls [] float64, but it holds no value
            if self.dtype is None:
                self.untyped_empties += 1
            else:
                self._append(np.empty((0, *self.trail), self.dtype))
            return
        else:
            arr = _as_array(index, item)
        if self.target is not None and not arr.dtype.hasobject:
            arr = _converted(index, arr, self.target)
        if self.dtype is None:
            self._fix_layout(index, arr)
        elif arr.dtype != self.dtype or arr.ndim == 0 or arr.shape[1:] != self.trail:
            raise _bad_item(index, arr, self.dtype, self.trail)
        self._append(arr)

    def _text_bytes(self, index, item) -> np.ndarray:
        """A text item's bytes as uint8; item 0 decides whether the map holds text, and which."""
        kind = next((kind for kind in _TEXT_KINDS.values() if isinstance(item, kind.type)), None)
        if self.dtype is None and self.text is None and kind is not None:
            if self.target is not None:
                raise ValueError(f"item {index}: text, but dtype={self.target} was asked; text is stored as "
                                 "its UTF-8 bytes")
            self.text = kind.name
        if kind is None or kind.name != self.text:
            raise ValueError(f"item {index}: {type(item).__name__}, but this map's items are "
                             f"{self.text or 'arrays'} (fixed by item 0)")
        try:
            return np.frombuffer(kind.encode(item), np.uint8)
        except UnicodeEncodeError as e:
            raise ValueError(f"item {index}: a str that UTF-8 cannot encode ({e})") from None

    def _fix_layout(self, index, arr: np.ndarray) -> None:
        _check_layout(arr.dtype, f"item {index}")
        if arr.ndim == 0:
            raise _bad_item(index, arr, arr.dtype, ())
        self.dtype, self.trail = arr.dtype, arr.shape[1:]
        for _ in range(self.untyped_empties):
            self._append(np.empty((0, *self.trail), self.dtype))

    def _append(self, arr: np.ndarray) -> None:
        if arr.nbytes >= BATCH_BYTES:  # a batch of its own, written before the caller goes on
            self.flush()
            self._write(np.ascontiguousarray(arr), [len(arr)])
            return
        self.batch += arr.tobytes()  # C order, whatever the layout; cheaper than numpy's copyto for small items
        self.lengths.append(len(arr))
        if len(self.batch) >= BATCH_BYTES or len(self.lengths) == BATCH_ITEMS:
            self.flush()

    def flush(self) -> None:
        """Write the batch: after this, every item added is in the files (or their buffers)."""
        if self.lengths:
            shape = (sum(self.lengths), *self.trail)
            rows = np.frombuffer(self.batch, self.dtype).reshape(shape) if self.batch else np.empty(shape, self.dtype)
            self._write(rows, self.lengths)
        self.batch, self.lengths = bytearray(), []

    def _write(self, rows: np.ndarray, lengths: list) -> None:
        self.dat.write(_as_bytes(rows))
        self.record(rows, np.asarray(lengths, np.int64))

    def record(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Account for items whose rows were just written to the .dat: hash, digests, offsets."""
        self.blocks.update(_as_bytes(rows))
        _update_hash_with_items(self.hash, rows, lengths)
        self.offsets.append(np.cumsum(lengths) + self.offsets.end)

    def take_layout(self, layout: tuple) -> None:
        """Fix the dtype, trailing shape and text from a map fed whole (its shards agree on them)."""
        if self.dtype is None:
            self.dtype, self.trail, self.text = layout

    def finish(self, meta: dict) -> dict:
        """Write what is left, fsync both files, write the json; return it."""
        if self.dtype is None:  # no item, or only empty lists: dtype= or numpy's float64, like np.asarray([])
            self._fix_layout(0, np.empty(0, np.uint8 if self.text else self.target or _EMPTY_LAYOUT[0]))
        self.flush()
        self.offsets.finish()
        for handle in (self.dat, self.starts):
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        self.hash.update(_map_tail(self.text))
        header = _map_json((self.dtype, self.trail, self.text), self.offsets.count - 1, self.offsets.end,
                           self.hash.hexdigest(), self._write_digests(), meta)
        _write_json(self.files.json, header)
        return header

    def _write_digests(self) -> dict:
        """Write the .digests file, every piece's digest of the .dat then of the .starts.npy, and
        return the json's keys that digest its blocks."""
        with _new_file(self.files.digests, "wb") as handle:
            for pieces in (self.blocks, self.offsets.pieces):
                handle.write(np.array(pieces.pieces(), "<u8").tobytes())
        (block_bytes, blocks), (starts_block_bytes, starts_blocks) = self.blocks.grouped(), self.offsets.pieces.grouped()
        return {"block_bytes": block_bytes, "piece_bytes": PIECE_BYTES, "block_digests": blocks,
                "starts_block_bytes": starts_block_bytes, "starts_block_digests": starts_blocks}

    def close(self) -> None:
        for handle in (self.dat, self.starts):
            with contextlib.suppress(OSError):  # a full disk refusing the last buffered bytes: discarded anyway
                handle.close()


class _SetWriter:
    """Streams dict items to one map per field in the staging's folder; item 0 fixes the fields.
    ``finish`` writes the set's json to the staging's temporary json."""

    def __init__(self, staging: _Staging, first: dict, dtypes: dict):
        if not first:
            raise ValueError("item 0: a dict of no fields; a set needs at least one")
        by_case = {}
        for name in first:
            if not _is_field_name(name):
                raise ValueError(f"item 0: field name {name!r} cannot name its map's files: use at most 100 "
                                 "letters, digits, _, - and . (not first), not ending .dat, .json, .starts.npy or .digests")
            other = by_case.setdefault(name.lower(), name)  # macOS and Windows would put both in one file
            if other != name:
                raise ValueError(f"item 0: fields {other!r} and {name!r} differ only in case, which some file "
                                 "systems do not tell apart; rename one")
        unknown = dtypes.keys() - first.keys()
        if unknown:
            raise ValueError(f"dtype= names field(s) {sorted(unknown)} that item 0 lacks (it has {list(first)})")
        if staging.folder.parent.is_symlink():
            raise ValueError(f"{staging.folder.parent} is a link; a set keeps its fields in a folder of its own")
        staging.folder.mkdir(parents=True)
        self.staging, self.writers = staging, {}
        for name in first:
            self.writers[name] = _ItemWriter(map_files(staging.folder / name), dtypes.get(name))

    def add(self, index: int, item) -> None:
        if not isinstance(item, dict):
            raise ValueError(f"item {index}: {type(item).__name__}, but this map's items are dicts of fields "
                             "(fixed by item 0)")
        if item.keys() != self.writers.keys():  # as sets: any order
            missing = [name for name in self.writers if name not in item]
            extra = [name for name in item if name not in self.writers]
            raise ValueError(f"item {index}: " + "; ".join(
                [f"no field {missing}"] * bool(missing) + [f"unexpected field {extra}"] * bool(extra)) +
                f" (item 0 fixed the fields {list(self.writers)})")
        for name, writer in self.writers.items():
            try:
                writer.add(index, item[name])
            except (ValueError, TypeError) as e:  # every item error starts "item {index}: "; add the field
                raise type(e)(str(e).replace(f"item {index}:", f"item {index}, field {name!r}:", 1)) from None

    def finish(self, meta: dict) -> dict:
        """Write every field's map, then the set's json; return it."""
        fields = {name: writer.finish({}) for name, writer in self.writers.items()}
        header = _set_json(fields, self.staging.tag, meta)
        _write_json(self.staging.temps.json, header)
        return header

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _checked_meta(meta: dict | None, function: str) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"{function}: meta must be a dict, not {type(meta).__name__}")
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{function}: meta must be JSON-serialisable ({e})") from None
    if len(text) > MAX_META_BYTES or _json_values(text) > MAX_META_VALUES:
        raise ValueError(f"{function}: meta takes {len(text)} bytes of JSON, more than a map's json keeps for "
                         f"it ({MAX_META_BYTES} bytes and {MAX_META_VALUES:,} values; it has "
                         f"{_json_values(text):,}); store large things in a file beside the map")
    return json.loads(text)


def _checked_dtype(dtype, where: str) -> np.dtype | dict | None:
    """dtype= as np.dtype, or for items with fields a dict of field name to np.dtype; checked."""
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {name: _checked_dtype(value, f"{where} for field {name!r}") for name, value in dtype.items()}
    torch = sys.modules.get("torch")  # a torch dtype only if torch is imported already
    if torch is not None and isinstance(dtype, torch.dtype):
        dtype = _numpy_dtype_of_torch(dtype, where)
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: {dtype!r} is not a dtype numpy knows ({e})") from None
    _check_layout(dtype, where)
    return dtype


def _numpy_dtype_of_torch(dtype, where: str) -> np.dtype:
    """The numpy dtype of a torch dtype: numpy's own, or ml_dtypes' (bfloat16, float8_*)."""
    torch = sys.modules["torch"]
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # a dtype numpy has only through ml_dtypes
        pass
    name = str(dtype).removeprefix("torch.")
    ml_dtypes = _import_ml_dtypes(f"{where}: {dtype}", TypeError)
    if not hasattr(ml_dtypes, name):
        raise TypeError(f"{where}: {dtype} has no numpy dtype picomap can store")
    return np.dtype(getattr(ml_dtypes, name))


class MapWriter:
    """Push-style writing of a map (or a set of fields) at ``path``: ``append`` items one by one.

    ::

        with pm.MapWriter("ds/train", meta={"source": "v3"}) as writer:
            for clip, tokens in source:
                writer.append({"audio": clip, "tokens": tokens})
        writer.header  # the json written

    Items are what ``build_map`` takes, which is a loop over this class: the same files, bytes and
    hash. A clean exit of the ``with`` block (or ``close()``) commits the map; an exception in it,
    Ctrl-C included, or ``discard()`` removes everything written, and so does dropping a writer
    never closed: a map already at ``path`` is untouched until the commit replaces it at once. An
    ``append`` that raises discards the writer too (later calls raise ValueError): a map is never
    committed with an item missing. ``len(writer)`` is the count of items appended. ``append``,
    ``close`` and ``discard`` may be called from several threads: each item appended is in the map
    once, in the order the calls took the writer's lock.
    """

    def __init__(self, path: str | os.PathLike, *, progress: bool = True, meta: dict | None = None, dtype=None):
        self._files = map_files(path)
        where = os.fspath(self._files.json)
        self._meta, self._dtype = _checked_meta(meta, where), _checked_dtype(dtype, f"{where}: dtype=")
        self.header: dict | None = None
        self._count, self._items, self._staging, self._error = 0, None, None, None
        name = self._files.json.name.removesuffix(".json")
        self._bar = None if not progress else tqdm(desc=f"build {name}", unit=" items")
        self._unshown = 0  # items appended since the bar last moved
        self._lock = threading.Lock()

    def append(self, item) -> None:
        """Add one item: an array (or array-like, CPU torch tensor), a str or bytes, or a dict of those."""
        with self._lock:
            self._add(item)

    def _add(self, item) -> None:
        """append, for the thread that holds the lock, or that alone sees the writer (build_map's)."""
        if self._items is None:
            self._start(isinstance(item, dict), item)
        try:
            self._items.add(self._count, item)
        except BaseException as e:
            self._discard()
            self._error = f"{type(e).__name__} at item {self._count}"
            raise
        self._count += 1
        if self._bar is not None:  # as tqdm's own loop does: the bar only moves every miniters items
            self._unshown += 1
            if self._unshown >= self._bar.miniters:
                self._bar.update(self._unshown)
                self._unshown = 0

    def _start(self, is_set: bool, first) -> None:
        """Stage the build and make its writer: a set's from item 0's fields, else a map's."""
        if self.header is not None or self._error is not None:
            raise ValueError(f"MapWriter({os.fspath(self._files.json)!r}): already "
                             f"{'committed' if self.header is not None else 'discarded (' + self._error + ')'}")
        if is_set != isinstance(self._dtype, dict) and self._dtype is not None:
            raise TypeError(f"item 0: dtype= must be a dict of field names to dtypes for items with fields, and "
                            f"a single dtype for others, not {self._dtype!r}")
        self._staging = staging = _Staging(self._files, is_set)
        self._dropped = weakref.finalize(self, staging.discard)  # a writer dropped unclosed commits nothing
        try:
            self._items = _SetWriter(staging, first, self._dtype or {}) if is_set else \
                _ItemWriter(staging.temps, self._dtype)
        except BaseException:
            self._discard()
            raise

    def close(self) -> dict:
        """Commit: write what is left and put the map in place at once; return its json."""
        with self._lock:
            if self.header is not None:
                return self.header
            if self._items is None:
                # no item: an empty map, even where dtype= named fields; merge_maps takes it beside sets
                if isinstance(self._dtype, dict):
                    self._dtype = None
                self._start(False, None)
            try:
                header = self._items.finish(self._meta)
                self._staging.commit()
            except BaseException:
                self._discard()
                raise
            self._dropped.detach()
            self._close_bar()
            self.header, self._items, self._staging = header, None, None
            return header

    def discard(self) -> None:
        """Remove everything written; a map already at the path stays as it was."""
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        if self._items is not None:
            self._items.close()
        if self._staging is not None:
            self._dropped()
        self._close_bar()
        self._error = self._error or "by discard()"
        self._items = self._staging = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.update(self._unshown)
            self._bar.close()
            self._bar = None

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        elif self.header is None:
            self.discard()


def build_map(items: Iterable, path: str | os.PathLike, *, progress: bool = True,
              meta: dict | None = None, dtype=None) -> dict:
    """Stream ``items`` to the map at ``path``; return the json written.

    Items are arrays, array-likes or CPU torch tensors; or ``str`` (or ``bytes``), stored as their
    UTF-8 bytes and loaded back as ``str`` (``bytes``); or dicts of those with the same keys every
    item, stored as a set: one map per field, loaded back as dicts. For arrays, item 0 fixes the
    dtype and the trailing shape ``shape[1:]`` (of each field, for dicts); the first dimension is
    ragged and may be 0. Items are stored in C order and never cast, each as it was when the
    iterable yielded it (a source may refill one buffer for every item). An empty list is a
    0-length item of the map's dtype; no items at all make an empty map (of ``dtype``, if that is
    one dtype), which ``merge_maps`` takes beside sets too. ``dtype`` (anything ``np.dtype`` takes,
    or a torch dtype; for dicts, a dict of field names to those) converts every item to it,
    storing a value only if it is the same value there (integers exactly, floats rounded but
    neither overflowing nor clipped, complex numbers for a real dtype only with a zero imaginary
    part, datetimes exactly, NaN and NaT as themselves; see _converted): else ValueError naming
    the item and the value, never a wrapped or clipped one. ``meta`` is a JSON-serialisable dict
    of your own, stored under ``"meta"``. The folder is created if missing. ``MapWriter`` does the
    same for items pushed one at a time.

    Raises ValueError (naming the item, and the field) for a 0-d item, one whose dtype or trailing
    shape differs, a missing or extra field, or a dtype a json cannot record; TypeError for object
    dtypes, a ``dtype`` numpy does not know, and a dict as ``items`` (give one dict a sample).
    On any failure, Ctrl-C included, no file is left behind and a map already at ``path`` is
    untouched; on success the new files replace it at once. Memory: one batch (``BATCH_BYTES``,
    ``BATCH_ITEMS``) a field, whatever the count.
    """
    if isinstance(items, dict):
        raise TypeError(f"build_map: items is a dict (of keys {list(items)[:5]}); pass an iterable of items, "
                        "e.g. a list of dicts [{'tokens': ..., 'label': ...}, ...] for samples with fields")
    with MapWriter(path, progress=progress, meta=meta, dtype=dtype) as writer:
        add = writer._add  # no other thread sees this writer: its lock would only cost (20% for tiny items)
        for item in items:
            add(item)
    return writer.header


# ---------------------------------------------------------------- merging

def merge_maps(paths: Iterable, out: str | os.PathLike, *, progress: bool = True, meta: dict | None = None) -> dict:
    """Concatenate the maps (or sets) at ``paths``, in order, into a new one at ``out``; return the json written.

    The result is byte for byte what ``build_map`` writes for all their items in that order (same
    ``.dat``, offsets and hash, field by field for sets), so a dataset's hash does not depend on how
    it was sharded. Its ``meta`` is ``meta`` if given, else the shards' own, which must then be the
    same. Shards with items must agree on dtype, trailing shape and text, and sets on their fields
    (in the first set's order); empty shards may record any layout, and an empty map goes with sets.

    Raises ValueError naming the shard on a mismatch (of fields, layout, or of meta without
    ``meta=``), if ``out`` is one of ``paths``, or if a shard is inconsistent (FileNotFoundError if
    missing); nothing is written then. The shards are fed whole to build_map's writer: their bytes
    are copied by the kernel where possible, and hashed as they are copied. Each shard's files are
    checked for consistency, not re-hashed: run verify_hash on a shard you do not trust. Same crash
    safety as build_map. Memory: about a kilobyte a shard and one batch; one shard open at a time.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"merge_maps: paths must be a list of maps, not the single path {paths!r}")
    target = map_files(out)
    shards, names, meta, total_bytes = _plan_merge(paths, target, None if meta is None else
                                                   _checked_meta(meta, "merge_maps"))
    with MapWriter(out, progress=False, meta=meta) as writer, \
            tqdm(total=2 * total_bytes, desc=f"merge {target.dat.name}", unit="B", unit_scale=True,
                 disable=not progress) as bar:  # each byte is copied, then hashed
        writer._start(names is not None, dict.fromkeys(names or ()))
        for where, identities in shards:
            opened = _open(where)
            if _identities(opened) != identities:
                raise ValueError(f"{where}: changed while merging; nothing was written")
            if isinstance(opened, _Set):
                for name, field_writer in writer._items.writers.items():
                    _append_map(field_writer, opened.fields[name], bar)
            elif opened.header.count:  # (an empty map among sets adds nothing)
                _append_map(writer._items, opened, bar)
    return writer.header


def _plan_merge(paths: Iterable, target: MapFiles, meta: dict | None) -> tuple[list, list | None, dict, int]:
    """Open and check each shard, one at a time and before anything is written, keeping about a
    kilobyte of each (a merge of thousands holds one open, and not their meta or block digests).

    Returns ``[(json file, identities)]`` a shard, the fields (None unless the shards are sets), the
    merged meta (``meta``, else the shards' own, which must agree), and the bytes to copy."""
    shards, total, first_meta, first_with_items = [], 0, {}, {}  # (the last: by field, a shard index and map)
    first_set = first_map = None  # (shard index, its fields or file) of the first set, and map with items
    for k, path in enumerate(paths):
        opened = _open(path)
        if _same_file(opened.files.dat, target.dat) or _same_file(opened.files.json, target.json):
            raise ValueError(f"merge_maps: out ({target.dat}) is shard {k}; merge into a new path")
        is_set = isinstance(opened, _Set)
        parts = opened.fields if is_set else {None: opened}
        where = opened.files.json if is_set else opened.files.dat
        if is_set:
            first_set = first_set or (k, list(parts))
            if set(parts) != set(first_set[1]):
                raise ValueError(f"merge_maps: shard {k} ({where}) has fields {list(parts)}, but shard "
                                 f"{first_set[0]} has fields {first_set[1]}")
        elif opened.header.count:
            first_map = first_map or (k, where)
        if first_set and first_map:
            k_map, where_map = first_map
            raise ValueError(f"merge_maps: shard {k_map} ({where_map}) has no fields, but shard {first_set[0]} "
                             f"has fields {first_set[1]}")
        for name, part in parts.items():
            if part.header.count:
                _check_same_layout(k, part, *first_with_items.setdefault(name, (k, part)))
        if k == 0:
            first_meta = opened.header.meta
        elif meta is None and opened.header.meta != first_meta:
            shown = [json.dumps(m)[:80] for m in (opened.header.meta, first_meta)]
            raise ValueError(f"merge_maps: shard {k} ({where}) has meta {shown[0]}, but shard 0 "
                             f"has {shown[1]}; pass meta= (picomap merge --meta JSON) to say what the merged map's is")
        shards.append((opened.files.json, _identities(opened)))
        total += sum(part.data.nbytes for part in parts.values())
    return shards, first_set and first_set[1], first_meta if meta is None else meta, total


def _check_same_layout(k: int, mine: _Map, first_k: int, first: _Map) -> None:
    if mine.header.layout != first.header.layout:
        ours, theirs = mine.header, first.header
        raise ValueError(f"merge_maps: shard {k} ({mine.files.dat}) holds {ours.text or ours.dtype.str} items of "
                         f"trailing shape {ours.trail_dim}, but shard {first_k} ({first.files.dat}) holds "
                         f"{theirs.text or theirs.dtype.str} of {theirs.trail_dim}")


def _identities(opened: _Map | _Set) -> tuple:
    """The mapped files a merge copies: the same files, or the shard changed since it was checked."""
    return tuple(part.identity for part in (opened.fields.values() if isinstance(opened, _Set) else [opened]))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def _append_map(writer: _ItemWriter, source: _Map, bar: tqdm) -> None:
    """Feed a whole map to a writer: its bytes copied by the kernel, then hashed, digested and its
    offsets (checked, shifted by the rows before) recorded, a run at a time, from its mapping."""
    writer.take_layout(source.header.layout)
    writer.flush()
    writer.dat.flush()  # the kernel copy appends where the file's own writes end
    _copy_into(source, writer.dat, bar)
    row_bytes = source.header.row_bytes
    for _, offsets in _runs(source.starts, row_bytes, source.files.starts):
        a, b = int(offsets[0]), int(offsets[-1])
        writer.record(source.data[a:b], np.diff(offsets))
        bar.update((b - a) * row_bytes)


def _copy_into(source: _Map, target, bar: tqdm) -> None:
    """Append the map's .dat to the open target, by the kernel where it can; the source must be
    the very file that was mapped when the map was opened."""
    with _regular_file(source.files.dat) as handle:
        if _identity(handle) != source.identity:
            raise ValueError(f"{source.files.dat}: changed while merging; nothing was written")
        size, done, fd = source.data.nbytes, 0, handle.fileno()
        while done < size:
            count = min(COPY_CHUNK_BYTES, size - done)
            try:
                moved = os.copy_file_range(fd, target.fileno(), count, done)
            except (AttributeError, OSError):  # no copy_file_range here (macOS) or not for these files
                # unbuffered, like copy_file_range: both must advance the same file position in order
                moved = os.write(target.fileno(), os.pread(fd, count, done))
            if moved == 0:
                raise ValueError(f"{source.files.dat}: shorter than it was when opened")
            done += moved
            bar.update(moved)


# ---------------------------------------------------------------- verifying

def verify_hash(path: str | os.PathLike, *, progress: bool = True, cache: str | os.PathLike | None = None) -> bool:
    """Recompute the content hash of the map (or set) at ``path``; return True if it matches the json.

    Raises ValueError on a mismatch, naming both hashes and, for maps with block digests (all
    but picomap 0.1's), the damaged items, or saying that the offsets or the json disagree when
    every block of the ``.dat`` is intact; for a set, naming the field. Raises ValueError or
    FileNotFoundError if the files are inconsistent or missing, offsets that decrease anywhere
    included. Cost: reads every byte of the map once; memory: one batch, whatever the count.
    It detects accidental damage; it is not a signature against deliberate tampering.
    """
    opened = _open_remote(path, cache) if _is_url(path) else _open(path)
    if isinstance(opened, _Map):
        return _verify_map(opened, progress)
    files, header, fields = opened
    if _set_hash(header.fields) != header.hash:
        raise ValueError(f"{files.json}: hash mismatch: the json says {header.hash}, its fields' hashes make "
                         f"{_set_hash(header.fields)}; the json's fields were changed")
    for name, field in fields.items():
        try:
            _verify_map(field, progress, follow=False)  # a set's own files, never links
        except ValueError as e:
            raise ValueError(f"{files.json}: field {name!r}: {e}") from None
    return True


def _verify_map(opened: _Map, progress: bool, follow: bool = True) -> bool:
    files, header, starts, data = opened[:4]
    if opened.remote is not None:  # fetched whole into the cache first, each piece checked on the way
        with tqdm(total=data.nbytes + opened.remote.starts.size, desc=f"fetch {opened.remote.url}", unit="B",
                  unit_scale=True, disable=not progress) as bar:
            opened.remote.everything(bar)
    # the pieces are digested in the same pass as the hash: then damage is located without a second
    pieces = None if header.block_digests is None else _BlockDigests(header.piece_bytes or header.block_bytes)
    with tqdm(total=data.nbytes, desc=f"verify {files.dat.name}", unit="B", unit_scale=True,
              disable=not progress) as bar:
        computed = _compute_hash(opened, bar, pieces)
    message = f"{files.json}: hash mismatch: the json says {header.hash}, the data hashes to {computed}"
    if pieces is None:
        if computed != header.hash:
            raise ValueError(f"{message}; {files.dat.name} or {files.starts.name} is damaged or was changed")
        return True
    found = pieces.grouped(header.block_bytes // header.piece_bytes)[1] if header.piece_bytes \
        else [f"{digest:016x}" for digest in pieces.pieces()]  # 1.0: each block's bytes digested whole
    bad = [k for k, (a, b) in enumerate(zip(found, header.block_digests)) if a != b]
    if computed == header.hash and bad:
        raise ValueError(f"{files.json}: the items hash as the json says, but its digests of blocks {bad[:5]} of "
                         f"{files.dat.name} differ from the data's: the json was changed; rebuild the map")
    if computed != header.hash and not bad:
        raise ValueError(f"{message}; every block of {files.dat.name} is intact, so {files.starts.name} or the "
                         "json's dtype, trail_dim or text differ from what was built")
    if bad:
        items = _damaged_items(starts, header.row_bytes, bad, header.block_bytes)
        raise ValueError(f"{message}; {files.dat.name} is damaged in {len(bad)} block(s) of {header.block_bytes} "
                         f"bytes, holding items {items}: rebuild those")
    if header.starts_block_digests is not None:
        _verify_digests_file(files, header, pieces, follow)
    return True


def _verify_digests_file(files: MapFiles, header: _MapJson, dat_pieces: _BlockDigests, follow: bool) -> None:
    """Check the .digests file against the .dat's pieces (digested already) and the offsets' (digested
    here), and the json's digests of the offsets' blocks: what a remote reader checks pieces with."""
    starts_pieces = _BlockDigests(header.piece_bytes)
    with _regular_file(files.starts, follow) as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            starts_pieces.update(chunk)
    if starts_pieces.grouped(header.starts_block_bytes // header.piece_bytes)[1] != header.starts_block_digests:
        raise ValueError(f"{files.json}: its digests of {files.starts.name}'s blocks differ from the file's; "
                         f"{files.starts.name} or the json was changed: rebuild the map")
    expected = b"".join(np.array(pieces.pieces(), "<u8").tobytes() for pieces in (dat_pieces, starts_pieces))
    with _regular_file(files.digests, follow) as handle:
        found = handle.read(len(expected) + 1)
    if found != expected:
        raise ValueError(f"{files.digests}: does not hold the digests of the map's pieces ({len(found)} bytes "
                         f"where {len(expected)} are due): it was changed; rebuild the map")


def _compute_hash(opened: _Map, bar: tqdm, pieces: _BlockDigests | None = None) -> str:
    """The content hash of a map's items as its files hold them, every offset checked on the way
    (ValueError naming the offsets file); the .dat's pieces digested into ``pieces`` on the way."""
    h, data, row_bytes = xxhash.xxh3_128(_MAP_HEAD), opened.data, opened.header.row_bytes
    for _, offsets in _runs(opened.starts, row_bytes, opened.files.starts):
        a, b = int(offsets[0]), int(offsets[-1])
        _update_hash_with_items(h, data[a:b], np.diff(offsets))
        if pieces is not None:
            pieces.update(_as_bytes(data[a:b]))
        bar.update((b - a) * row_bytes)
    h.update(_map_tail(opened.header.text))
    return h.hexdigest()


def _damaged_items(starts: np.ndarray, row_bytes: int, blocks: list[int], block_bytes: int) -> str:
    """'items 3-7, 120' for the items with bytes in the given blocks (the offsets checked already)."""
    ranges = []
    for block in blocks:
        first_row = block * block_bytes // row_bytes
        end_row = -(-min((block + 1) * block_bytes, int(starts[-1]) * row_bytes) // row_bytes)
        first = int(np.searchsorted(starts, first_row, side="right")) - 1
        last = int(np.searchsorted(starts, end_row, side="left")) - 1
        if ranges and first <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], last)
        else:
            ranges.append([first, last])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)


# ---------------------------------------------------------------- loading

def get_loader_fn(path: str | os.PathLike, *, access: str = "auto", cache: str | os.PathLike | None = None,
                  cache_bytes: int | None = None) -> tuple[MapLoader, int]:
    """Open the map at ``path`` once and return ``(load, N)``; see MapLoader for ``load``.

    ``access`` says how items are read: ``"cached"``, a plain mapping, no system call per item (for
    maps that fit in memory); ``"cold"``, exactly each item's pages and nothing around them (for
    maps larger than memory, read in random order); ``"auto"`` (default), cold if the ``.dat`` is
    larger than half the memory the page cache may use (the machine's, or a container's limit).
    ``load.access`` says which it took; pickles keep it.

    Checks the json, the offsets' header and both ends, and the files' sizes, and raises
    ValueError (inconsistent or corrupt, naming the file and the problem) or FileNotFoundError.
    Cost: O(1) time and memory whatever the item count; the offsets and data are mapped, not read.
    """
    load = MapLoader(path, access=access, cache=cache, cache_bytes=cache_bytes)
    return load, len(load)


class MapLoader:
    """Item access to an opened map or set; ``get_loader_fn`` returns one as ``load``.

    ``MapLoader(path, access="auto")`` opens the map (see get_loader_fn). ``load(i)`` is item i as
    a read-only view into the mapped ``.dat`` (no copy, no I/O until its bytes are touched);
    ``load(i, copy=True)`` a private writable copy. Indices follow Python: negative ones count from
    the end, numpy integers work, out of range raises IndexError, a float or str raises TypeError.
    ``load[a:b]`` is a loader of those items, sharing the mappings. Cost: O(1), about as much as
    slicing an ndarray.

    Opening reads no offsets: the loader maps them, so every process that opens a map shares one
    copy of them, and checks them 16,384 items at a time, the first time one of those items is
    loaded. An item whose offsets are damaged raises ValueError naming the file and the item; no
    item is ever served that lies outside the data or overlaps another.

    ``close()`` (or a ``with`` block) lets go of the files: later calls raise ValueError, and the
    mappings are released once no view from them is alive. A loader pickles as its absolute path,
    hash and items: the receiver reopens the map, and raises ValueError if it was rebuilt since.

    For a map of text, ``load(i)`` is a new ``str`` (or ``bytes``). For a set, it is a dict of
    its fields' items (``copy=True`` copies each); ``load.fields`` holds each field's own loader,
    and ``dtype``, ``trail_dim``, ``lengths``, ``starts``, ``data`` and ``access`` are dicts by field.
    """
    # The contract every loader keeps; the subclasses below say how items are read and returned.
    # Slots make load(i)'s attribute reads measurably cheaper; a __getattr__ here would undo that.
    __slots__ = ("_files", "_header", "_first", "_count", "_url")  # _url: (url, cache) for a remote map
    _reads_cold = False

    def __new__(cls, path: str | os.PathLike, access: str = "auto", cache: str | os.PathLike | None = None,
                cache_bytes: int | None = None):
        # Opening happens here, since what it finds picks the class that serves the map
        return _opened_loader(path, access, cache, cache_bytes)

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        for i in range(self._count):
            yield self(i)

    def __getitems__(self, indices) -> list:
        """Many items at once: PyTorch's DataLoader fetches a whole batch with one call."""
        return [self(i) for i in indices]

    def __enter__(self) -> MapLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path | str:
        """The map's base path (its files are this plus .dat, .starts.npy, .json), or its URL."""
        if self._url is not None:
            return self._url[0]
        return self._files.json.with_name(self._files.json.name.removesuffix(".json"))

    @property
    def hash(self) -> str:
        return self._header.hash

    @property
    def meta(self) -> dict:
        """The ``meta`` given to build_map, a new copy each time: changing it changes nothing else."""
        return copy.deepcopy(self._header.meta)

    def __reduce__(self):
        # the absolute path, identity and items only: a receiver maps the files itself, whatever
        # the map's size, from whatever folder it runs in
        where, cache, cache_bytes = self._url or (os.path.abspath(self.path), None, None)
        return _reopen, (where, self.hash, self._first, self._first + self._count,
                         "cold" if self._reads_cold else "cached", self.fields is not None, cache, cache_bytes)

    def __repr__(self) -> str:
        items = f"{self._count} items" if self._first == 0 and self._count == self._header.count else \
            f"items {self._first}-{self._first + self._count - 1} ({self._count})"
        return f"<picomap.MapLoader {os.fspath(self.path)!r}: {items} of {self._layout()}>"

    def _slice_range(self, items: slice) -> tuple[int, int]:
        """The items a..b-1 that ``items`` names, a <= b; ValueError unless its step is 1."""
        first, end, step = items.indices(self._count)
        if step != 1:
            raise ValueError(f"{self.path}: only contiguous slices of a map (step 1), not step {step}; "
                             "torch.utils.data.Subset takes any indices")
        return first, max(first, end)

    def _closed(self) -> Exception:
        return ValueError(f"{self.path}: the loader is closed")

    def _index_error(self, i) -> Exception:
        if self._is_closed():
            return self._closed()
        try:
            operator.index(i)
        except TypeError:
            return TypeError(f"{self.path}: item indices must be integers, not {type(i).__name__}")
        return IndexError(f"{self.path}: item {i} is out of range for a map of {self._count} items")


class _ArrayLoader(MapLoader):
    """A MapLoader of one map of arrays, read through the page cache: load(i) is one slice of the
    mapped rows. The cold and text loaders are this with another way to read or return an item."""
    __slots__ = ("_starts", "_data", "_begins", "_ends", "_chunks", "_checked", "_lock", "_lengths", "_rebased",
                 "_root", "_remote")

    def _serve(self, files: MapFiles, header: _MapJson, data: np.ndarray, starts: np.ndarray, first: int,
               root: _ArrayLoader | None = None, remote: _Remote | None = None):
        """Serve the items whose offsets are ``starts`` (both ends checked), the first being item
        ``first`` of the map, for a slice of ``root``: the one way every array loader is made. A
        remote map's ``remote`` makes pieces whole in its cache before they are read."""
        self._files, self._header, self._data, self._starts = files, header, data, starts
        self._first, self._count, self._rebased, self._root = first, len(starts) - 1, None, root or self
        self._remote = remote if root is None else root._remote
        remote = self._remote
        self._url = None if remote is None else (remote.url, os.path.abspath(remote.cache), remote.cache_bytes)
        # memoryviews index to Python ints fast and allocate nothing per item
        self._begins, self._ends = memoryview(starts)[:-1], memoryview(starts)[1:]
        # A flag a chunk, set once its offsets are checked, then as many again never set. Example,
        # 3 chunks: _checked = [c0, c1, c2, 0, 0, 0, 0]. For i = -1, i >> CHECK_SHIFT is -1, whose
        # flag (the last) is never set: a negative index always takes the slow path, which counts
        # it from the end, with no test for i < 0 on the fast one. Up to 2**31 items the flags are a
        # list (2 MiB at most; CPython indexes lists fastest); past that, whatever the files claim,
        # anonymous pages that the system provides only as they are set.
        self._chunks = -(-self._count >> CHECK_SHIFT)
        flags = 2 * self._chunks + 1
        self._checked = [0] * flags if flags <= 1 << 18 else mmap.mmap(-1, flags)
        self._lock, self._lengths = threading.Lock(), None
        return self

    def __call__(self, i, copy: bool = False) -> np.ndarray:
        try:
            if self._checked[i >> CHECK_SHIFT]:
                item = self._data[self._begins[i]:self._ends[i]]
            else:
                item = self._load_checking(i)
        except (IndexError, TypeError):
            if isinstance(i, slice) and self._data is not None:
                return self._sliced(i)
            raise self._index_error(i) from None
        if copy:
            return item.copy()
        return item

    __getitem__ = __call__

    def _load_checking(self, i: int) -> np.ndarray:
        """load(i) the first time an item of its chunk is loaded, and for every negative i."""
        if i < 0:
            if i < -self._count:
                raise IndexError
            i += self._count
        if i >= self._count:
            raise IndexError
        if not self._checked[i >> CHECK_SHIFT]:
            self._check_chunk(i)
        return self._data[self._begins[i]:self._ends[i]]

    def _check_chunk(self, i: int) -> None:
        """Check the offsets of item i's chunk: they never decrease, and they lie within the first and
        last offsets of every aligned run of 2, 4, 8 ... chunks that holds the chunk. The bounds are
        the same in every process whatever it loaded before, and two chunks that pass lie in two
        runs side by side, split at an offset between them: so no two items served by any loader of
        the map, in any process, overlap or leave the data. Example, chunk 5 of 8: its offsets lie
        within those that begin chunks 4 and 6 (run 4-5), 4 and 8 (4-7), and 0 and 8 (0-7). A slice
        has the whole map's loader check the chunks its own chunk's items lie in."""
        if self._root is not self:
            if self._root._is_closed():
                raise self._closed()
            chunk = i >> CHECK_SHIFT
            first, last = chunk << CHECK_SHIFT, min((chunk + 1) << CHECK_SHIFT, self._count) - 1
            for item in (self._first + first, self._first + last):
                if not self._root._checked[item >> CHECK_SHIFT]:
                    self._root._check_chunk(item)
            self._checked[chunk] = 1
            return
        chunk, starts, count = i >> CHECK_SHIFT, self._starts, self._count
        first, end, bounds, run = chunk << CHECK_SHIFT, min((chunk + 1) << CHECK_SHIFT, count), [], 2
        while run < 2 * self._chunks:
            begin = chunk // run * run
            bounds.append((begin << CHECK_SHIFT, min((begin + run) << CHECK_SHIFT, count)))
            run *= 2
        if self._remote is not None:  # the offsets read below, fetched first, outside the lock (a fork may come)
            self._remote.offsets([(first, end + 1)] + [(k, k + 1) for bound in bounds for k in bound])
        with self._lock:
            low = max([0] + [int(starts[begin]) for begin, _ in bounds])
            high = min([int(starts[-1])] + [int(starts[end_]) for _, end_ in bounds])
            try:
                _check_offsets(starts[first:end + 1], first, low, high, self._files.starts)
            except ValueError as e:
                raise ValueError(f"{e}: item {self._first + i} is not served; verify_hash tells more") from None
            self._checked[chunk] = 1

    def _sliced(self, items: slice) -> _ArrayLoader:
        """``load[a:b]``: a loader of items a..b-1, of this one's class, sharing its mappings (no copy).
        Its first and last offsets are checked by the loader of the whole map, as loads there are:
        so no two slices of it, nor the map and a slice, serve rows of one item as another's."""
        first, end = self._slice_range(items)
        root = self._root
        for i in (self._first + first, self._first + end - 1):  # the chunks holding offsets first and end
            if 0 <= i < root._count and not root._checked[i >> CHECK_SHIFT]:
                root._check_chunk(i)
        return object.__new__(type(self))._serve(self._files, self._header, self._data,
                                                 self._starts[first:end + 1], self._first + first, root)

    def _whole(self, rows: bool = False) -> None:
        """For a remote map, fetch all of this loader's offsets (and rows) that are not in its cache."""
        if self._remote is not None:
            if rows and self._remote.cap is not None:
                raise ValueError(f"{self.path}: load.data would need every piece of a map read with cache_bytes=, "
                                 "which keeps fewer; open it without cache_bytes to map it whole")
            self._remote.offsets([(self._first, self._first + self._count + 1)])
            if rows:
                self._remote.rows([(int(self._starts[0]) * self._header.row_bytes,
                                    int(self._starts[-1]) * self._header.row_bytes)])

    def _is_closed(self) -> bool:
        return self._data is None

    def close(self) -> None:
        """Let go of the map's files: calls after this raise ValueError. Views already handed out
        stay valid; the mappings are released when the last of them is gone."""
        self._data = self._starts = self._lengths = self._rebased = None
        self._begins = self._ends = memoryview(b"")
        self._checked = bytearray()

    def _live(self, name: str):
        """The array held in slot ``name``; ValueError once closed."""
        array = getattr(self, name)
        if array is None:
            raise self._closed()
        return array

    @property
    def access(self) -> str:
        """How items are read: ``"cached"`` (a plain mapping) or ``"cold"`` (exactly each item's pages)."""
        return "cold" if self._reads_cold else "cached"

    @property
    def fields(self) -> dict | None:
        """For a set, its fields' loaders by name (each a MapLoader of its own); None for a single map."""
        return None

    @property
    def dtype(self) -> np.dtype:
        return self._header.dtype

    @property
    def trail_dim(self) -> tuple[int, ...]:
        return self._header.trail_dim

    @property
    def data(self) -> np.ndarray:
        """The items' rows as one read-only mapped array of shape ``(rows, *trail_dim)``: the whole
        ``.dat``, or for a slice of a map its items' rows. No copy."""
        starts = self._live("_starts")
        self._whole(rows=True)
        return self._data if self._count == self._header.count else self._data[starts[0]:starts[-1]]

    @property
    def starts(self) -> np.ndarray:
        """The ``N + 1`` row offsets into ``data`` as a read-only int64 array, mapped from the file
        as they are (``load(i)`` checks those it uses, ``verify_hash`` all): no copy, no cost. For a
        slice of a map, offsets from its first row: computed on first use, 8 bytes an item."""
        starts = self._live("_starts")
        self._whole()
        if self._first == 0:
            return starts
        if self._rebased is None:
            self._rebased = starts - starts[0]
            self._rebased.flags.writeable = False
        return self._rebased

    @property
    def lengths(self) -> np.ndarray:
        """Each item's first dimension as int64, read-only. Computed on first use, checking every
        offset: O(N) time and 8 bytes an item of private memory in each process that asks."""
        if self._lengths is None:
            starts = self._live("_starts")
            self._whole()
            for _ in _runs(starts, self._header.row_bytes, self._files.starts):
                pass
            self._checked[:self._chunks] = ([1] if isinstance(self._checked, list) else b"\1") * self._chunks
            lengths = np.diff(starts)
            lengths.flags.writeable = False
            self._lengths = lengths
        return self._lengths

    def _layout(self) -> str:
        """What its items are: 'float32 (*, 2)', or 'str' or 'bytes' for text."""
        return self._header.text or f"{self.dtype} ({', '.join(map(str, ('*', *self.trail_dim)))})"


class _ColdLoader(_ArrayLoader):
    """A MapLoader for a map larger than memory. Its mapping is advised MADV_RANDOM, so that no
    read brings in pages around it, and each load asks for exactly its item's pages with one
    madvise(MADV_WILLNEED); ``__getitems__`` asks once for each run of adjacent items, so a batch
    of a block-shuffled pass costs about one sequential read. Views stay views."""
    __slots__ = ()

    def _serve(self, files, header, data, *rest, **options) -> _ColdLoader:
        remote = options.get("remote")
        if data.nbytes and (remote is None or remote.cold):
            data.base.madvise(mmap.MADV_RANDOM)
        return super()._serve(files, header, data, *rest, **options)

    @property
    def _reads_cold(self) -> bool:
        # a remote map's loader is this class for its hook; it reads its cache cold only if asked to
        return self._remote is None or self._remote.cold

    def __call__(self, i, copy: bool = False) -> np.ndarray:
        item = _ArrayLoader.__call__(self, i)
        if not isinstance(item, np.ndarray):  # load[a:b]: a loader, cold like this one
            return item
        return self._fetched([self._bytes_of(i)], [item], [i], copy)[0]

    __getitem__ = __call__

    def __getitems__(self, indices) -> list:
        indices = list(indices)  # (an iterator would be used up by the first pass)
        items = [_ArrayLoader.__call__(self, i) for i in indices]
        return self._fetched([self._bytes_of(i) for i in indices], items, indices)

    def _bytes_of(self, i: int) -> tuple[int, int]:
        """Where item i's bytes lie in the .dat: (start, end)."""
        i = operator.index(i)
        i += self._count if i < 0 else 0
        return self._begins[i] * self._header.row_bytes, self._ends[i] * self._header.row_bytes

    def _fetched(self, spans: list, views: list, indices: list, copy: bool = False) -> list:
        """The views (of these byte spans of the .dat; the items at indices, or windows) once their
        pages are asked for; for a remote map, once its pieces are whole in the cache, and under a
        cache cap, as copies made while those pieces are held."""
        spans, remote = sorted(span for span in spans if span[1] > span[0]), self._remote
        try:
            if spans and remote is not None and remote.cap is not None:
                with remote.cap.held(spans):
                    return [view.copy() for view in views]
            if spans and remote is not None:
                remote.rows(spans)
        except ValueError as e:
            shown = ", ".join(str(self._first + i + (self._count if i < 0 else 0)) for i in indices[:8])
            raise ValueError(f"{e}; item(s) {shown}{', ...' * (len(indices) > 8)} not served" if indices else
                             f"{e}; not served") from None
        if spans and (remote is None or remote.cold):  # (a remote piece's pages were just written or read)
            _will_need(self._data.base, spans)
        return [view.copy() for view in views] if copy else views


def _will_need(mapping: mmap.mmap, spans: list) -> None:
    """One madvise(MADV_WILLNEED) for each run of byte spans (sorted) no more than a page apart."""
    page, run_start, run_end = mmap.PAGESIZE, None, None
    for start, end in spans + [(None, None)]:
        if start is not None and run_end is not None and start <= run_end + page:
            run_end = max(run_end, end)
            continue
        if run_start is not None:
            aligned = run_start - run_start % page
            mapping.madvise(mmap.MADV_WILLNEED, aligned, run_end - aligned)
        run_start, run_end = start, end


class _TextLoader(_ArrayLoader):
    """A MapLoader for a map of text: ``load(i)`` is a new str (or bytes) of the item's bytes."""
    __slots__ = ("_bytes", "_decode")  # the .dat as a memoryview, which slices in half the time an ndarray does

    def _serve(self, files, header, data, *rest, **options) -> _TextLoader:
        self._bytes, self._decode = memoryview(data), _TEXT_KINDS[header.text].decode
        return super()._serve(files, header, data, *rest, **options)

    def __call__(self, i, copy: bool = False) -> str | bytes | MapLoader:
        try:  # the fast path of _ArrayLoader.__call__, on the memoryview
            raw = self._bytes[self._begins[i]:self._ends[i]] if self._checked[i >> CHECK_SHIFT] else None
        except (IndexError, TypeError):
            raw = None
        if raw is None:  # a chunk's first load, a negative index, a slice or an error: as the parent does
            raw = _ArrayLoader.__call__(self, i)
            if not isinstance(raw, np.ndarray):  # load[a:b]: a text loader too
                return raw
        return self._decoded(i, raw)

    __getitem__ = __call__

    def _decoded(self, i: int, raw) -> str | bytes:
        try:
            return self._decode(raw)
        except UnicodeDecodeError as e:
            i = operator.index(i)
            item = self._first + i + (self._count if i < 0 else 0)  # the map's index, whatever the slice
            raise ValueError(f"{self._files.dat}: item {item} is not UTF-8 ({e}); verify_hash tells more") from None

    def close(self) -> None:
        super().close()
        self._bytes = None


class _ColdTextLoader(_TextLoader, _ColdLoader):
    """A text loader read cold (access="cold", or "auto" for a map larger than memory): each item's
    pages, and nothing around them, are asked for before its bytes are decoded."""
    __slots__ = ()

    def __call__(self, i, copy: bool = False) -> str | bytes | MapLoader:
        raw = _ColdLoader.__call__(self, i)  # its pages asked for, then decoded
        return self._decoded(i, raw) if isinstance(raw, np.ndarray) else raw  # (load[a:b]: a loader)

    __getitem__ = __call__

    def __getitems__(self, indices) -> list:
        indices = list(indices)
        return [self._decoded(i, raw) for i, raw in zip(indices, _ColdLoader.__getitems__(self, indices))]


class _SetLoader(MapLoader):
    """A MapLoader for a set: ``load(i)`` is a dict of its fields' items, each field served by a
    loader of its own (``load.fields``); the attributes of a single map's layout are dicts by field."""
    __slots__ = ("_fields", "_calls")

    def _serve(self, files: MapFiles, header: _SetJson, fields: dict, url: tuple | None = None) -> _SetLoader:
        some = next(iter(fields.values()))
        self._files, self._header, self._fields, self._url = files, header, fields, url
        self._first, self._count = some._first, len(some)
        # (name, the field's bound __call__): load(i) then skips a lookup a field
        self._calls = tuple((name, field.__call__) for name, field in fields.items())
        return self

    def __call__(self, i, copy: bool = False) -> dict | MapLoader:
        try:
            if isinstance(i, slice):
                first, end = self._slice_range(i)
                return object.__new__(_SetLoader)._serve(self._files, self._header, {
                    name: field[first:end] for name, field in self._fields.items()}, self._url)
            return {name: call(i, copy) for name, call in self._calls}
        except (IndexError, TypeError, ValueError) as e:  # a field's error names the field's files
            if isinstance(e, ValueError) and not self._is_closed():
                raise  # damaged offsets or a slice's step: the file or the set named is the one to fix
            raise self._index_error(i) from None

    __getitem__ = __call__

    def __getitems__(self, indices) -> list:
        indices = list(indices)  # each field reads them: an iterator would be used up by the first
        columns = [field.__getitems__(indices) for field in self._fields.values()]
        return [dict(zip(self._fields, row)) for row in zip(*columns)]

    def _is_closed(self) -> bool:
        return next(iter(self._fields.values()))._is_closed()

    def close(self) -> None:
        for field in self._fields.values():
            field.close()

    @property
    def _reads_cold(self) -> bool:
        return next(iter(self._fields.values()))._reads_cold

    def _by_field(self, name: str) -> dict:
        return {field_name: getattr(field, name) for field_name, field in self._fields.items()}

    fields = property(lambda self: dict(self._fields), doc=_ArrayLoader.fields.__doc__)
    access = property(lambda self: self._by_field("access"), doc="Each field's access, by field.")
    dtype = property(lambda self: self._by_field("dtype"), doc="Each field's dtype, by field.")
    trail_dim = property(lambda self: self._by_field("trail_dim"), doc="Each field's trailing shape, by field.")
    data = property(lambda self: self._by_field("data"), doc="Each field's rows (MapLoader.data), by field.")
    starts = property(lambda self: self._by_field("starts"), doc="Each field's offsets (MapLoader.starts), by field.")
    lengths = property(lambda self: self._by_field("lengths"), doc="Each field's lengths (MapLoader.lengths), by "
                       "field: O(N) each, on first use.")

    def _layout(self) -> str:
        return "fields " + ", ".join(f"{name} {field._layout()}" for name, field in self._fields.items())


def _opened_loader(path, access: str, cache, cache_bytes: int | None = None) -> MapLoader:
    """The loader of the map or set at a path or a URL (fetched into ``cache``)."""
    if not _is_url(path):
        return _loader(_open(path), access)
    opened = _open_remote(path, cache, cache_bytes)
    return _loader(opened, access, (_url_base(path), os.path.abspath(_default_cache() if cache is None else cache), cache_bytes))


def _loader(opened: _Map | _Set, access: str, url: tuple | None = None) -> MapLoader:
    """The loader that serves an opened map or set: its class says how items are read and returned.
    A remote map's is a cold one, which asks for each item's pieces before it serves the item."""
    if isinstance(opened, _Set):  # its fields share the page cache: read all cold or none
        cold = _cold(sum(field.data.nbytes for field in opened.fields.values()), access)
        return object.__new__(_SetLoader)._serve(opened.files, opened.header, {
            name: _loader(field, "cold" if cold else "cached") for name, field in opened.fields.items()}, url)
    cold = _cold(opened.data.nbytes, access)
    if opened.remote is not None:  # served by a cold loader, whose hook fetches; its cache read cold or not
        opened.remote.cold, cold = cold, True
    kind = ((_ColdTextLoader if cold else _TextLoader) if opened.header.text else
            _ColdLoader if cold else _ArrayLoader)
    # the digests are verify_hash's and the remote's alone: not kept by every loader
    header = opened.header._replace(block_digests=None, starts_block_digests=None)
    return object.__new__(kind)._serve(opened.files, header, opened.data, opened.starts, 0, remote=opened.remote)


def _reopen(path: str, digest: str, first: int, end: int, access: str, is_set: bool,
            cache: str | None = None, cache_bytes: int | None = None) -> MapLoader:
    """A pickled loader, in its receiver: the map (or set) at path or URL, if it still has the hash
    it was pickled with (ValueError if it was rebuilt since), sliced to the items it served."""
    load = _opened_loader(path, access, cache, cache_bytes)
    where = path if _is_url(path) else load._files.json
    if (load.fields is not None) != is_set:
        raise ValueError(f"{where}: " + ("no longer a set of fields" if is_set else
                                         "a set of fields, where a single map was expected"))
    if load.hash != digest:
        raise ValueError(f"{where}: the map was replaced since this loader was pickled "
                         f"(hash {load.hash}, expected {digest})")
    return load if (first, end) == (0, len(load)) else load[first:end]


def _memory_for_page_cache() -> int:
    """The machine's physical memory, or a container's limit (a cgroup's) where that is lower."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume the map fits
        return 2**63
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):  # absent, or "max"
            memory = min(memory, int(Path(limit).read_text()))
    return memory


def _cold(nbytes: int, access: str) -> bool:
    """Whether to read a map of nbytes cold: as asked, or for "auto" if nbytes is more than
    COLD_ABOVE of the memory the page cache may use."""
    if access not in ("auto", "cached", "cold"):
        raise ValueError(f"picomap: access must be 'auto', 'cached' or 'cold', not {access!r}")
    if not hasattr(mmap.mmap, "madvise"):  # Windows: no way to read exactly an item's pages
        if access == "cold":
            raise ValueError("picomap: access='cold' needs mmap.madvise, which this system lacks")
        return False
    if access != "auto":
        return access == "cold"
    return nbytes > COLD_ABOVE * _memory_for_page_cache()


# ---------------------------------------------------------------- sampling

_SPLITMIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_FEISTEL_ROUNDS = 4
# Indices are computed this many at a time: small enough that memory stays under a megabyte,
# large enough that numpy's per-call cost vanishes.
SAMPLER_CHUNK = 4096


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64: each bit of x sways every bit of the result.
    Integer arithmetic only, so the same on every machine and numpy version."""
    x = x ^ (x >> np.uint64(30))
    x = x * _SPLITMIX[0]
    x = x ^ (x >> np.uint64(27))
    x = x * _SPLITMIX[1]
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, keys: np.ndarray, half: int, inverse: bool = False) -> np.ndarray:
    """A keyed bijection on range(4**half): a Feistel network of len(keys) rounds (keys is
    (rounds,) or (rounds, len(x)), one key a round for every x)."""
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in (keys[::-1] if inverse else keys):
        if inverse:
            left, right = right ^ (_mix(left ^ key) & mask), left
        else:
            left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << np.uint64(half)) | right


def _permute(x: np.ndarray, size: int, keys: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A keyed bijection on range(size), applied to each x: the Feistel network on the next power
    of four, walked again from any value past size until it lands inside (Black and Rogaway's
    cycle-walking). O(1) memory and O(1) time an index, about 2 steps on average."""
    if size <= 1:
        return x
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    y = _feistel(x, keys, half, inverse)
    outside = y >= np.uint64(size)
    while outside.any():
        y[outside] = _feistel(y[outside], keys[:, outside] if keys.ndim == 2 else keys, half, inverse)
        outside = y >= np.uint64(size)
    return y


def _round_keys(*parts) -> np.ndarray:
    """Round keys from the parts' text: xxhash, never numpy's random streams, which may change."""
    text = "|".join(map(str, ("picomap.Sampler", *parts)))
    return np.array([xxhash.xxh3_64_intdigest(f"{text}|{r}".encode()) for r in range(_FEISTEL_ROUNDS)], np.uint64)


def _default_world() -> tuple[int, int]:
    """torch.distributed's world size and rank where a process group is up, else (1, 0); picomap
    never imports torch itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Sampler:
    """Shuffled, sharded, resumable indices in O(1) memory, for a DataLoader's ``sampler=``.

    Each epoch's order is a sequence P, a permutation of ``range(n)`` that depends only on
    ``(seed, epoch, n, block)`` (``range(n)`` itself when ``shuffle=False``), the same on every
    rank, machine, Python and numpy version. With ``block=B > 1`` the items are cut into blocks of B
    consecutive items (the last shorter), the blocks are shuffled, and P gives all of one block's
    items, shuffled, before the next block's: mostly sequential reads of a map larger than memory.
    Without ``drop_last`` P is padded to ``num_replicas * L`` by repeating its first items, with
    ``L = ceil(n / num_replicas)``; with it, ``L = n // num_replicas``. Rank r yields
    ``P[r*L + start:(r+1)*L]``, so ``len(sampler) == L - start``.

    ``num_replicas`` and ``rank`` come from torch.distributed when neither is given and a process
    group is up (else 1 and 0); giving only one of them without a process group raises ValueError.

    ``state_dict()`` says where this rank's current pass is; ``load_state_dict`` on a sampler made
    with the same arguments makes the next ``iter()`` yield exactly what that pass had not yet
    yielded; the epoch after starts afresh. A state taken after a pass's last index does not pin
    that pass: if ``set_epoch`` chose another epoch, that epoch is yielded whole.
    ``set_epoch(epoch, start)`` does the same from a count of indices you kept yourself. Cost:
    O(1) memory and time to the first index whatever n; P is computed SAMPLER_CHUNK indices at a time.
    """

    def __init__(self, n_or_sized, *, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False, block: int = 1):
        n = len(n_or_sized) if hasattr(n_or_sized, "__len__") else operator.index(n_or_sized)
        if (num_replicas is None) != (rank is None) and _default_world() == (1, 0):
            raise ValueError(f"Sampler: num_replicas={num_replicas} and rank={rank}: give both, or neither "
                             "(then they come from torch.distributed, whose process group is not up)")
        world, own_rank = _default_world() if num_replicas is None or rank is None else (None, None)
        num_replicas = operator.index(world if num_replicas is None else num_replicas)
        rank = operator.index(own_rank if rank is None else rank)
        if n < 0 or num_replicas < 1 or operator.index(block) < 1:
            raise ValueError(f"Sampler: n ({n}) must be >= 0, num_replicas ({num_replicas}) and block ({block}) >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Sampler: rank {rank} is outside range({num_replicas})")
        self.n, self.shuffle, self.seed, self.block = n, bool(shuffle), operator.index(seed), operator.index(block)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, bool(drop_last)
        self.share = n // num_replicas if drop_last else -(-n // num_replicas)  # L
        self.set_epoch(0)
        self._epoch_chosen = False  # until set_epoch is called: then a finished pass's state pins nothing

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next passes those of ``epoch``, skipping this rank's first ``start`` indices, in O(1)."""
        epoch, start = operator.index(epoch), operator.index(start)
        if not 0 <= start <= self.share:
            raise ValueError(f"Sampler: start {start} is outside 0..{self.share}, this rank's share of an epoch")
        self.epoch, self.start, self.position, self._epoch_chosen = epoch, start, start, True

    def __len__(self) -> int:
        return self.share - self.start

    def __iter__(self):
        self.position = self.start
        a, end, size = self.rank * self.share + self.start, (self.rank + 1) * self.share, 64
        while a < end:  # chunks from 64 indices up to SAMPLER_CHUNK: the first index comes at once
            chunk = self.order(np.arange(a, min(a + size, end), dtype=np.int64))
            a, size = a + size, min(2 * size, SAMPLER_CHUNK)
            for index in chunk.tolist():
                self.position += 1  # before the yield: a state_dict taken now counts this index as given
                yield index
        self.start = 0  # a pass resumed in the middle is over; the next one starts at the beginning

    def order(self, positions: np.ndarray) -> np.ndarray:
        """P[positions] for this epoch, positions past n wrapping around (the padding): int64."""
        if self.n == 0:
            return positions[:0]
        j = (positions % self.n).astype(np.uint64)
        if not self.shuffle:
            out = j
        elif self.block == 1:
            out = _permute(j, self.n, _round_keys(self.seed, self.epoch, self.n, 1, "items"))
        else:
            out = self._block_order(j)
        return out.astype(np.int64)

    def _block_order(self, j: np.ndarray) -> np.ndarray:
        """P[j] with blocks: a shuffled block, then its items shuffled. Example: n = 10, B = 4 gives
        blocks [0-3] [4-7] [8-9]; if the blocks' order is (2, 0, 1), positions 0-1 fall in block 2
        (the short one, at slot 0), positions 2-5 in block 0 and 6-9 in block 1: each position is
        first placed in its slot, whose length is B except at the short block's, then permuted."""
        B, blocks = self.block, -(-self.n // self.block)
        last_size = self.n - (blocks - 1) * B
        block_keys = _round_keys(self.seed, self.epoch, self.n, B, "blocks")
        # where the shorter last block lands among the shuffled blocks: positions after it shift
        at = int(_permute(np.array([blocks - 1], np.uint64), blocks, block_keys, inverse=True)[0])
        start_of_last, B64 = np.uint64(at * B), np.uint64(B)
        before, after = j < start_of_last, j >= start_of_last + np.uint64(last_size)
        shifted = j - np.uint64(last_size) + B64  # for positions after it
        slot = np.where(before, j // B64, np.where(after, shifted // B64, np.uint64(at)))
        offset = np.where(before, j % B64, np.where(after, shifted % B64, j - start_of_last))
        chosen = _permute(slot, blocks, block_keys)
        item_keys = _mix(_round_keys(self.seed, self.epoch, self.n, B, "items")[:, None] ^ chosen[None, :])
        in_last = chosen == np.uint64(blocks - 1)
        offset[~in_last] = _permute(offset[~in_last], B, item_keys[:, ~in_last])
        offset[in_last] = _permute(offset[in_last], last_size, item_keys[:, in_last])
        return chosen * B64 + offset

    def state_dict(self) -> dict:
        """Where this rank's pass is, and what identifies the order: small, JSON-serialisable."""
        return {"epoch": self.epoch, "yielded": self.position, "n": self.n, "seed": self.seed, "block": self.block,
                "num_replicas": self.num_replicas, "rank": self.rank, "drop_last": self.drop_last,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``: ValueError naming the first field that differs from this sampler's.

        A state whose pass was complete (taken after an epoch's last index) pins nothing if
        ``set_epoch`` chose another epoch: that epoch is then yielded from its start (as when a
        training loop resumes from a checkpoint taken at the end of an epoch). Otherwise it leaves
        the pass empty, as a state taken midway leaves the rest of its pass."""
        mine = self.state_dict()
        for key in ("n", "seed", "block", "num_replicas", "rank", "drop_last", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"Sampler: the state was saved with {key}={state.get(key)!r}, "
                                 f"but this sampler has {key}={mine[key]!r}")
        if state["yielded"] >= self.share and self._epoch_chosen and state["epoch"] != self.epoch:
            return
        self.set_epoch(state["epoch"], start=state["yielded"])


# ---------------------------------------------------------------- windows

class Windows:
    """Fixed-length language-model windows packed across a map's items, with the items' boundaries.

    ``w = Windows(load, seq_len)``: window ``k`` is rows ``k*seq_len .. k*seq_len + seq_len`` of
    ``load.data`` (``seq_len + 1`` rows, so inputs ``w[k][:-1]`` and labels ``w[k][1:]``), read
    across item boundaries. Consecutive windows share one row: every row but the first is a label
    exactly once. ``len(w) == (rows - 1) // seq_len`` (0 for fewer than two rows); the rows past
    the last whole window are never served. ``load`` may be a slice (``load[900:]``): its windows
    hold its own items' rows only. Window k is Megatron-LM's GPT sample k for one epoch with the
    documents in stored order and ``add_extra_token_to_sequence``.

        w = pm.Windows(load, 1024)
        x = w[7]                  # read-only view, shape (1025, *trail_dim)
        cu = w.cu_seqlens(7)      # int32 [0, 311, 900, 1024]: items start at rows 311 and 900

    ``w[k]`` (same as ``w(k)``) is a zero-copy read-only view; negative k counts from the end, out
    of range raises IndexError, a float or str TypeError. ``w.__getitems__(ks)`` is a list of
    windows: the hook through which a DataLoader fetches a batch. It pickles as its loader and
    ``seq_len`` (a few hundred bytes), so DataLoader workers reopen the map themselves, and it
    works with ``Sampler(w, ...)`` (``block=B`` shuffles runs of B consecutive windows: consecutive
    rows, for a map larger than memory).

    A set of fields or a text map is refused (ValueError); a structured dtype (tokens and a loss
    mask, say) is windowed row for row. ``seq_len`` is an integer from 1 to 2**31 - 1 (ValueError
    or TypeError otherwise). ``w[k]`` keeps its own view of the rows, so it still works once the
    loader is closed; ``cu_seqlens`` then raises ValueError.

    Cost: construction reads nothing (O(1) time and memory whatever the item count); ``w[k]`` is
    one slice; ``cu_seqlens(k)`` two binary searches in the mapped offsets and a read of the
    offsets inside the window, checked (see there). Nothing is built, in any process, at any size.
    """
    __slots__ = ("_load", "_seq_len", "_rows", "_starts", "_low", "_count", "_span", "_row_bytes")

    def __new__(cls, load: MapLoader | None = None, seq_len: int | None = None):
        # a cold (or remote) loader's windows ask for their pages (or pieces) up front: a class of
        # their own keeps w[k] as it is
        if cls is Windows and isinstance(load, _ColdLoader):
            cls = _ColdWindows
        return super().__new__(cls)

    def __init__(self, load: MapLoader, seq_len: int):
        if not isinstance(load, MapLoader):
            raise TypeError(f"Windows: load must be a picomap loader (get_loader_fn's), not {type(load).__name__}")
        if load.fields is not None:
            raise ValueError(f"{load.path}: a set of fields has no single row to window; give Windows one "
                             f"field's loader (load.fields[name]) or a map of a structured dtype")
        if load._header.text:
            raise ValueError(f"{load.path}: a map of text ({load._header.text}) holds UTF-8 bytes, not tokens; "
                             "windows are over token maps")
        try:
            seq_len = operator.index(seq_len)
        except TypeError:
            raise TypeError(f"{load.path}: seq_len must be an integer, not {type(seq_len).__name__}") from None
        if not 1 <= seq_len < 2**31:  # cu_seqlens are int32, as varlen attention takes them
            raise ValueError(f"{load.path}: seq_len must be from 1 to 2**31 - 1, not {seq_len}")
        starts = load._starts
        if starts is None:
            raise ValueError(f"{load.path}: the loader is closed")
        # both ends of a map's (or a slice's) offsets are checked when it is opened (or sliced)
        low, high = int(starts[0]), int(starts[-1])
        self._load, self._seq_len, self._starts, self._low = load, seq_len, starts, low
        self._rows = load._data[low:high]
        self._count = max(high - low - 1, 0) // seq_len
        self._span, self._row_bytes = seq_len + 1, load._header.row_bytes

    def __call__(self, k) -> np.ndarray:
        try:  # the fast path, for an index in range: a float or a str fails the comparison or the slice
            if 0 <= k < self._count:
                first = k * self._seq_len
                return self._rows[first:first + self._span]
        except (TypeError, ValueError):  # (ValueError: an array's truth value)
            pass
        first = self._index(k) * self._seq_len  # a negative index, or the error to raise
        return self._rows[first:first + self._span]

    __getitem__ = __call__

    def _index(self, k) -> int:
        """k as an index in range(len(self)): negative ones from the end; IndexError or TypeError."""
        try:
            i = operator.index(k)
        except TypeError:
            raise TypeError(f"{self._load.path}: window indices must be integers, not {type(k).__name__}") from None
        j = i + self._count if i < 0 else i
        if not 0 <= j < self._count:
            raise IndexError(f"{self._load.path}: window {i} is out of range for {self._count} windows of "
                             f"{self._seq_len} rows")
        return j

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        for k in range(self._count):
            yield self(k)

    def __getitems__(self, ks) -> list:
        """Many windows at once, as a DataLoader fetches a batch: a list of views, in the order of ks."""
        firsts = [self._index(k) * self._seq_len for k in ks]
        rows, span = self._rows, self._span
        return [rows[first:first + span] for first in firsts]

    def cu_seqlens(self, k) -> np.ndarray:
        """Window k's item boundaries as int32: 0, then each offset j, ``0 < j < seq_len``, at which an
        item starts inside the window, once, then ``seq_len``.

        The offset lists the window's input positions (``w[k][:-1]``) at which a new item begins:
        an item that begins at the window's first row is its 0, one that begins at its last row
        (only a label there) is not listed, and empty items add nothing (they begin where the next
        does). So ``np.diff(cu_seqlens(k))`` are the lengths of the runs of one item each, as
        flash-attention's varlen ``cu_seqlens`` and position ids that restart at each item need.

            w.cu_seqlens(0)   # array([0, 437, 768, 1024], dtype=int32) for items of 437, 331, ... rows

        Cost: two binary searches in the mapped offsets (O(log N)) and a read of the offsets of the
        items that begin inside the window. Those offsets and the two around them are checked, and
        so, the first time, are the offsets of the 16,384-item chunks holding the window's first and
        last items, as ``load(i)`` checks them: offsets that decrease or fall outside the window (a
        damaged file) raise ValueError naming the offsets file and the items, and nothing out of the
        window, or from an item that overlaps another, is ever returned. ``verify_hash`` checks all.
        """
        k = self._index(k)
        first = k * self._seq_len + self._low  # the window's first row, in the map's rows
        end = first + self._seq_len  # its last row (a label only)
        starts = self._starts
        lo = self._search(first, "right")  # the first item to begin after row first
        hi = self._search(end, "left")  # the first item to begin at row end or later
        if not 1 <= lo <= hi < len(starts):
            self._damaged(k, lo, hi, first, end)
        self._check_items(k, lo - 1, hi - 1)
        if self._load._remote is not None:
            self._load._remote.offsets([(self._load._first + lo - 1, self._load._first + hi + 1)])
        around = starts[lo - 1:hi + 1]  # the item holding row first, those beginning inside, the one after
        inside = around[1:-1]
        if around[0] > first or around[-1] < end or inside.size and (
                inside[0] <= first or inside[-1] >= end or bool((inside[1:] < inside[:-1]).any())):
            self._damaged(k, lo, hi, first, end)
        if inside.size > 1:
            inside = inside[np.concatenate(([True], inside[1:] != inside[:-1]))]  # empty items: one boundary
        out = np.empty(inside.size + 2, np.int32)
        out[0], out[-1] = 0, self._seq_len
        np.subtract(inside, first, out=out[1:-1], casting="unsafe")
        return out

    def _search(self, row: int, side: str) -> int:
        """np.searchsorted(offsets, row, side); for a remote map, by halves first, each offset it
        probes fetched, down to one piece of offsets: about 20 pieces, once, whatever the count."""
        starts, remote, lo, hi = self._starts, self._load._remote, 0, len(self._starts)
        if remote is not None:
            while hi - lo > remote.piece // 8:
                mid = (lo + hi) // 2
                remote.offsets([(self._load._first + mid, self._load._first + mid + 1)])
                lo, hi = (mid + 1, hi) if starts[mid] < row or side == "right" and starts[mid] == row else (lo, mid)
            remote.offsets([(self._load._first + lo, self._load._first + hi)])
        return lo + int(np.searchsorted(starts[lo:hi], row, side))

    def _check_items(self, k, *items: int) -> None:
        """Have the loader check the offsets of the chunks holding these items, as load(i) does, unless
        it has: a search led astray by a damaged offset elsewhere then lands in offsets that are
        ordered with every chunk checked so far, or raises."""
        load = self._load
        if load._starts is None:
            raise load._closed()
        for item in items:
            if not load._checked[item >> CHECK_SHIFT]:
                try:
                    load._check_chunk(item)
                except ValueError as e:
                    raise ValueError(f"{e}; window {k} is not served") from None

    def _damaged(self, k: int, lo: int, hi: int, first: int, end: int):
        """Raise the ValueError of a window whose offsets do not bracket it in order."""
        item = self._load._first
        shown = f"items {item + max(lo - 1, 0)}-{item + min(hi, len(self._starts) - 1)}"
        raise ValueError(f"{self._load._files.starts}: the offsets of {shown} do not increase through rows "
                         f"{first}-{end} (damaged offsets): window {k} is not served; verify_hash tells more")

    @property
    def load(self) -> MapLoader:
        """The loader whose rows are windowed."""
        return self._load

    @property
    def seq_len(self) -> int:
        """Rows a window's inputs span; a window holds one more."""
        return self._seq_len

    def __reduce__(self):
        return Windows, (self._load, self._seq_len)  # the loader pickles as its path, hash and items

    def __repr__(self) -> str:
        return f"<picomap.Windows {os.fspath(self._load.path)!r}: {self._count} windows of {self._seq_len} rows>"


class _ColdWindows(Windows):
    """Windows of a cold loader, whose mapping reads no page around a fault: each call first asks
    for its windows' pages with one madvise(MADV_WILLNEED) a run of adjacent windows, so that they
    are read at once rather than a fault at a time (a block-shuffled batch: about one read); and of
    a remote map's loader, which first fetches the pieces they lie in."""
    __slots__ = ()

    def __call__(self, k) -> np.ndarray:
        return self.__getitems__([k])[0]

    __getitem__ = __call__

    def __getitems__(self, ks) -> list:
        firsts = [self._index(k) * self._seq_len for k in ks]
        rows, span, row_bytes = self._rows, self._span, self._row_bytes
        spans = [((self._low + first) * row_bytes, (self._low + first + span) * row_bytes) for first in firsts]
        return self._load._fetched(spans, [rows[first:first + span] for first in firsts], [])


# ---------------------------------------------------------------- mixtures

# A mixture's length stays below this, so that every position fits an int64.
MIX_MAX_LENGTH = 1 << 62


def _weight_fraction(weight, d: int):
    """weight as an exact fraction, a float read as its shortest decimal (0.7 is 7/10, not the
    nearest binary fraction): TypeError unless it is a real number, ValueError unless finite and >= 0."""
    if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
        raise TypeError(f"Mix: weight {d} must be a real number, not {type(weight).__name__}")
    if isinstance(weight, numbers.Rational):
        value = Fraction(int(weight.numerator), int(weight.denominator))
    elif not math.isfinite(float(weight)):
        raise ValueError(f"Mix: weight {d} is {weight}; weights must be finite")
    else:
        value = Fraction(repr(float(weight)))
    if value < 0:
        raise ValueError(f"Mix: weight {d} is {weight}; weights must be >= 0")
    return value


def _split_tree(weights: list) -> tuple[int, list]:
    """The sources of positive weight as a binary tree, built as Huffman's code is (the two lightest
    subtrees joined first, ties to the older): (root, nodes). A node is (2a, b, 2b, heavier, lighter)
    for a share a/b of its positions going to its heavier child (of two even ones, the older); a
    child is a node's index, or ~d for source d.

    Why Huffman's: each split rounds its heavier child's count to within half an item, and a
    source's error is the sum over its path of each split's, scaled by the shares below it. The
    node a source joins first may send it any share s < 1; every node above that gets at most
    2/3 of its parent's positions (its sibling, joined when it was among the two lightest, weighs
    at least its heavier half). So the error stays below (1 + s(1 + 2/3 + 4/9 + ...)) / 2 < 2
    items at every prefix, and about 1 in practice."""
    heap = [(weight, d, ~d) for d, weight in enumerate(weights) if weight > 0]
    heapq.heapify(heap)
    nodes, age = [], len(weights)
    while len(heap) > 1:
        light_weight, _, light = heapq.heappop(heap)
        heavy_weight, _, heavy = heapq.heappop(heap)
        if light_weight == heavy_weight:  # even weights: the older first, so that source 0 leads
            light, heavy = heavy, light
        share = heavy_weight / (light_weight + heavy_weight)
        nodes.append((2 * share.numerator, share.denominator, 2 * share.denominator, heavy, light))
        heapq.heappush(heap, (light_weight + heavy_weight, age, len(nodes) - 1))
        age += 1
    return heap[0][2], nodes


def _heavier_before(n: int, node: tuple) -> int:
    """How many of a node's first n positions go to its heavier child: n * a/b rounded half up,
    within half an item of its share; position n goes there iff this grows from n to n + 1."""
    twice_a, b, twice_b = node[0], node[1], node[2]
    return (n * twice_a + b) // twice_b


def _mixture_source(source, d: int) -> int:
    """len(source): TypeError unless it is sized and indexable."""
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(f"Mix: source {d} ({type(source).__name__}) must have __len__ and __getitem__")
    return operator.index(len(source))


def _rebuilt_mix(sources, weights, seed, length, shuffle) -> Mix:
    """Unpickling: the mixture made again from its arguments."""
    return Mix(sources, weights, seed=seed, length=length, shuffle=shuffle)


class Mix:
    """Several datasets as one, by weight: ``mix[i]`` is ``sources[d][j]``, ``(d, j) = mix.locate(i)``.

    ``pm.Mix([web, code], [0.7, 0.3])``: 70% of the items from ``web``, 30% from ``code``, in a
    fixed interleaving. Sources are any sized, indexable datasets (loaders, slices, sets, Windows,
    lists); weights are non-negative finite reals, one a source, normalised, and kept exact, never
    rounded (a float is read as its shortest decimal: 0.7 is 7/10). At every prefix of the mixture
    each source's count is within about one item of its share, as Megatron's greedy blend (1.3 at
    worst in the tests), and provably within 2. A source of weight 0 is never drawn.

    A source's items are drawn in passes: each pass is all of its items, in a fresh order keyed by
    ``(seed, source, pass)`` with ``shuffle=True``, in stored order with ``shuffle=False``; no
    item repeats before its source is exhausted, a source is upsampled by more passes and
    downsampled by stopping mid-pass. ``length`` defaults to the longest in which no item repeats:
    the scarcest source (the smallest ``len / weight``) drawn exactly once whole, none more.

    Indices follow Python (negative from the end, numpy integers work); out of range raises
    IndexError, a non-integer TypeError. ``mix.__getitems__(indices)`` groups a batch by source
    and calls each source's own ``__getitems__`` once (its ``__getitem__`` an item if it has
    none). Bad weights (negative, NaN or infinite, all zero, not one a source) and an empty source
    of positive weight raise ValueError; a source without ``__len__`` or ``__getitem__``, or a
    weight that is not a real number (a bool included), TypeError.

    How: the sources form a binary tree (Huffman's, by weight); each node sends position n of its
    own to its heavier child iff ``round(n * share)`` grows there, and the rounded count is the
    position's rank in that child. So ``locate`` is a walk from the root, integer arithmetic only,
    the same on every machine and numpy version: O(depth), log2 of the sources for even weights,
    then the source's pass permuted as the Sampler permutes (about 30 µs a ``locate``, 12 µs an
    item through ``__getitems__``, which permutes a batch at once). Nothing is tabled: memory is
    O(sources) whatever the length and the sources' sizes (4 KiB for 2, 59 KiB for 100), and
    construction takes 0.05 ms for 2 sources, 2.4 ms for 100 of even weights (the default length
    is a binary search a source, each step a walk of the tree: 1.3 s for 1,000 sources of weights
    2^-i, whose tree is 1,000 deep; a pickle carries the length, so workers do not search again).
    It pickles as its sources (loaders as their paths) and arguments, so it goes to DataLoader workers, and
    ``pm.Sampler(mix)`` shuffles, shards and resumes it like any dataset.
    """

    def __init__(self, sources, weights, *, seed: int = 0, length: int | None = None, shuffle: bool = True):
        sources, weights = tuple(sources), tuple(weights)
        if len(sources) != len(weights):
            raise ValueError(f"Mix: {len(sources)} sources but {len(weights)} weights; give one weight a source")
        if not sources:
            raise ValueError("Mix: no sources; give at least one")
        sizes = [_mixture_source(source, d) for d, source in enumerate(sources)]
        fractions = [_weight_fraction(weight, d) for d, weight in enumerate(weights)]
        total = sum(fractions)
        if total == 0:
            raise ValueError("Mix: every weight is 0; give at least one source a positive weight")
        for d, (size, share) in enumerate(zip(sizes, fractions)):
            if share > 0 and size == 0:
                raise ValueError(f"Mix: source {d} is empty but has weight {weights[d]}")
        self._sources, self._weights, self._sizes = sources, weights, sizes
        self._shares = [share / total for share in fractions]
        self.seed, self.shuffle = operator.index(seed), bool(shuffle)
        self._root, self._nodes = _split_tree(self._shares)
        self._paths = self._leaf_paths()
        self._length = self._longest_without_repeats() if length is None else operator.index(length)
        if not 0 <= self._length < MIX_MAX_LENGTH:
            raise ValueError(f"Mix: length {self._length} is outside 0..2^62")

    def _leaf_paths(self) -> dict:
        """Each drawn source's path from the root: [(node, heavier?)], to count its draws."""
        paths, todo = {}, [(self._root, [])]
        while todo:
            child, path = todo.pop()
            if child < 0:
                paths[~child] = path
                continue
            node = self._nodes[child]
            todo += [(node[3], path + [(child, True)]), (node[4], path + [(child, False)])]
        return paths

    def drawn(self, d: int, length: int) -> int:
        """How many of the first ``length`` positions draw from source d (within about an item of
        ``length * weights[d]``), for any length >= 0, past ``len(mix)`` too: O(depth). A source
        out of range raises IndexError, a negative length ValueError.

            pm.Mix([range(10), range(5)], [7, 3]).drawn(1, 100)   # 30
        """
        d, n = operator.index(d), operator.index(length)
        if not 0 <= d < len(self._sources):
            raise IndexError(f"Mix: there is no source {d} among {len(self._sources)}")
        if n < 0:
            raise ValueError(f"Mix: a length of {n} positions; lengths are >= 0")
        if d not in self._paths:
            return 0
        for node, heavier in self._paths[d]:
            heavy = _heavier_before(n, self._nodes[node])
            n = heavy if heavier else n - heavy
        return n

    def _longest_without_repeats(self) -> int:
        """The default length: the largest L at which no source has been drawn more than len(source)
        times. A binary search a source (its count only grows with L), from its share's estimate."""
        longest = MIX_MAX_LENGTH - 1
        for d in self._paths:
            size, share = self._sizes[d], self._shares[d]
            low, high = 0, min(MIX_MAX_LENGTH - 1, math.ceil((size + 2) / share))
            while self.drawn(d, high) <= size:  # (rarely: only where a source strays an item or more)
                if high == MIX_MAX_LENGTH - 1:
                    break
                high = min(MIX_MAX_LENGTH - 1, 2 * high)
            if self.drawn(d, high) <= size:
                continue  # never used up within the longest mixture there can be
            while high - low > 1:  # drawn(d, low) <= size < drawn(d, high)
                middle = (low + high) // 2
                low, high = (middle, high) if self.drawn(d, middle) <= size else (low, middle)
            longest = min(longest, low)
        return longest

    def __len__(self) -> int:
        return self._length

    def _index(self, i) -> int:
        try:
            index = operator.index(i)
        except TypeError:
            raise TypeError(f"Mix: item indices must be integers, not {type(i).__name__}") from None
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"Mix: item {i} is out of range for a mixture of {self._length} items")
        return index

    def _draw(self, n: int) -> tuple[int, int]:
        """Position n (checked) -> (d, k): source d's draw number k, walking the tree from the root."""
        child, nodes = self._root, self._nodes
        while child >= 0:
            twice_a, b, twice_b, heavier, lighter = nodes[child]
            heavy = (n * twice_a + b) // twice_b  # how many of the node's first n went the heavier way
            if (n * twice_a + twice_a + b) // twice_b > heavy:
                child, n = heavier, heavy
            else:
                child, n = lighter, n - heavy
        return ~child, n

    def _keys(self, d: int, passes: int) -> np.ndarray:
        """The round keys of source d's pass: its order, as the Sampler's permutations are keyed."""
        return _round_keys(self.seed, "mix", d, passes, self._sizes[d])

    def locate(self, i) -> tuple[int, int]:
        """``(d, j)``: position i of the mixture is item j of source d. O(depth), integers only.

            pm.Mix([range(10), range(5)], [1, 1], shuffle=False).locate(3)   # (1, 1)
        """
        d, k = self._draw(self._index(i))
        passes, j = divmod(k, self._sizes[d])
        if self.shuffle:
            j = int(_permute(np.array([j], np.uint64), self._sizes[d], self._keys(d, passes))[0])
        return d, j

    def __call__(self, i):
        d, j = self.locate(i)
        return self._sources[d][j]

    __getitem__ = __call__

    def _locate_many(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """locate for many checked indices: (sources, items) as int64 arrays, one _permute a source."""
        draws = [self._draw(n) for n in indices]
        d = np.array([source for source, _ in draws], np.int64)
        k = np.array([draw for _, draw in draws], np.int64)
        sizes = np.array(self._sizes, np.int64)[d] if len(d) else d
        passes, items = np.divmod(k, np.maximum(sizes, 1))
        if self.shuffle:
            for source in np.unique(d).tolist():  # each item with its own pass's keys
                where = np.flatnonzero(d == source)
                runs, run_of = np.unique(passes[where], return_inverse=True)
                keys = np.stack([self._keys(source, run) for run in runs.tolist()], axis=1)
                items[where] = _permute(items[where].astype(np.uint64), self._sizes[source],
                                        keys[:, run_of.reshape(-1)]).astype(np.int64)
        return d, items

    def __getitems__(self, indices) -> list:
        """A batch, in the order asked: each source's ``__getitems__`` called once with its share
        of the batch (its ``__getitem__`` an item where it has none). DataLoader uses this."""
        sources, items = self._locate_many([self._index(i) for i in indices])
        batch = [None] * len(sources)
        for d in np.unique(sources).tolist():
            where = np.flatnonzero(sources == d).tolist()
            wanted, source = items[where].tolist(), self._sources[d]
            fetched = source.__getitems__(wanted) if hasattr(source, "__getitems__") else [source[j] for j in wanted]
            for k, item in zip(where, fetched):
                batch[k] = item
        return batch

    @property
    def sources(self) -> tuple:
        """The sources, as given."""
        return self._sources

    @property
    def weights(self) -> tuple[float, ...]:
        """Each source's share, normalised (as floats; the mixture keeps them exact)."""
        return tuple(float(share) for share in self._shares)

    def __reduce__(self):
        # the arguments only: the receiver builds its tree again, in microseconds
        return _rebuilt_mix, (self._sources, self._weights, self.seed, self._length, self.shuffle)

    def __repr__(self) -> str:
        parts = ", ".join(f"{size:,} items × {weight:.4g}" for size, weight in zip(self._sizes, self.weights))
        order = f"shuffled, seed {self.seed}" if self.shuffle else "in stored order"
        return f"<picomap.Mix: {self._length:,} items of {len(self._sources)} sources ({parts}; {order})>"


# ---------------------------------------------------------------- command line

def _demo(folder: str | None) -> None:
    import tempfile
    with contextlib.ExitStack() as stack:
        folder = folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="picomap-demo-"))
        path = os.path.join(folder, "demo")
        rng = np.random.default_rng(0)
        items = [rng.integers(0, 50_000, int(n), dtype=np.int32) for n in rng.integers(16, 1024, 10_000)]
        t0 = time.perf_counter()
        header = build_map(items, path, progress=False, meta={"source": "picomap demo"})
        t1 = time.perf_counter()
        verify_hash(path, progress=False)
        t2 = time.perf_counter()
        load, n = get_loader_fn(path)
        t3 = time.perf_counter()
        picks = rng.integers(0, n, 100_000).tolist()
        for i in picks:
            load(i)
        t4 = time.perf_counter()
        mb = header["total_rows"] * 4 / 1e6
        print(f"built   {n:,} int32 token items ({mb:.1f} MB) at {path}  in {t1 - t0:.3f} s")
        print(f"verified hash {header['hash']}  in {t2 - t1:.3f} s")
        print(f"opened  in {(t3 - t2) * 1e3:.2f} ms; load(0).shape = {load(0).shape}, "
              f"load(-1)[:5] = {load(-1)[:5].tolist()}")
        print(f"loaded  {len(picks):,} random items in {t4 - t3:.3f} s "
              f"({(t4 - t3) / len(picks) * 1e9:.0f} ns each, zero-copy views)")
        if not all(np.array_equal(load(i), items[i]) for i in range(n)):
            raise ValueError(f"{path}: the demo map does not read back as written")
        print("checked every item reads back equal to what was written")
        load.close()


def _length_stats(starts: np.ndarray, where: Path) -> str:
    """'min / mean / max' of the item lengths, in bounded runs: no array of N lengths."""
    low, high, total = None, 0, 0
    for _, offsets in _runs(starts, 1, where):
        lengths = np.diff(offsets)
        low = int(lengths.min()) if low is None else min(low, int(lengths.min()))
        high, total = max(high, int(lengths.max())), total + int(offsets[-1] - offsets[0])
    if low is None:
        return "-"
    mean = f"{total / (len(starts) - 1):.3f}".rstrip("0").rstrip(".")  # as min and max are: no exponent
    return f"{low} / {mean} / {high}"


def _info(path: str, full_meta: bool) -> None:
    with MapLoader(path) as load:
        meta = json.dumps(load.meta)
        if len(meta) > 200 and not full_meta:
            meta = f"{meta[:200]}... ({len(meta):,} characters; --full-meta shows all)"
        lines = [("path", load.path), ("items", f"{len(load):,}")]
        for name, part in (load.fields or {"": load}).items():  # a set's lines say which field
            prefix = f"{name}." if name else ""
            stats, header = _length_stats(part.starts, part._files.starts), part._header
            lines += [(prefix + "dtype", header.text or part.dtype), (prefix + "trailing shape", part.trail_dim),
                      (prefix + "rows", f"{header.total_rows:,}"),
                      (prefix + "bytes", f"{header.total_rows * header.row_bytes:,}"),
                      (prefix + "item length min/mean/max", stats)]
        lines += [("hash", load.hash), ("meta", meta)]
        width = max(len(label) for label, _ in lines)
        for label, value in lines:
            print(f"{label:>{width}}: {value}")


def _meta_argument(text: str | None) -> dict | None:
    try:
        return None if text is None else json.loads(text)
    except ValueError as e:
        raise ValueError(f"--meta must be a JSON object, such as '{{\"source\": \"v3\"}}' ({e})") from None


def main(argv: list[str] | None = None) -> int:
    """The ``picomap`` command: ``demo [DIR]``, ``info PATH``, ``verify PATH``, ``merge [--meta JSON] OUT IN...``.
    Returns the exit code."""
    import argparse
    parser = argparse.ArgumentParser(prog="picomap", description="Ragged numpy datasets on disk.")
    parser.add_argument("--version", action="version", version=f"picomap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="build, verify and load a small demo map").add_argument(
        "folder", nargs="?", help="where to write it (default: a temporary folder)")
    info = commands.add_parser("info", help="describe a map")
    info.add_argument("path")
    info.add_argument("--full-meta", action="store_true", help="print all of meta, not its first 200 characters")
    commands.add_parser("verify", help="check a map's content hash").add_argument("path")
    merge = commands.add_parser("merge", help="concatenate maps, in order, into a new one")
    merge.add_argument("out")
    merge.add_argument("inputs", nargs="+", metavar="in")
    merge.add_argument("--meta", metavar="JSON",
                       help="the merged map's meta, a JSON object (default: the inputs', which must agree)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            _demo(args.folder)
        elif args.command == "info":
            _info(args.path, args.full_meta)
        elif args.command == "merge":
            header = merge_maps(args.inputs, args.out, progress=False, meta=_meta_argument(args.meta))
            print(f"merged {len(args.inputs)} maps into {args.out}: {header['count']:,} items, hash {header['hash']}")
        else:
            verify_hash(args.path, progress=False)
            print(f"ok: {args.path} is intact")
    except (ValueError, TypeError, OSError) as e:
        print(f"picomap {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
