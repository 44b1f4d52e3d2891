"""picomap: a ragged dataset of numpy arrays on disk, verified, loaded as zero-copy views.

File format. A map at base path ``B`` is three files; a reader may rely on all of this:

``B.dat``
    The items' bytes in C order, back to back, no header and no padding. Its size is exactly
    ``total_rows * row_bytes``, where ``row_bytes = dtype.itemsize * prod(trail_dim)``.
``B.starts.npy``
    A 1-D ``.npy`` of ``count + 1`` offsets, written as little-endian uint64 (a reader accepts any
    integer type), in rows, the units of the first dimension, not bytes: item ``i`` is rows
    ``starts[i]:starts[i+1]`` of ``B.dat``. ``starts[0] == 0``, offsets never decrease,
    ``starts[-1] == total_rows``.
``B.json``
    One JSON object. ``dtype``: numpy's ``str(dtype)`` (``"float32"``, ``">i4"``, ``"bfloat16"``
    for ml_dtypes types), or for a structured dtype its ``.npy`` descr as a list; byte order is
    part of it. ``trail_dim``: the trailing shape ``shape[1:]`` shared by every item, a list of
    ints. ``count``: the number of items. ``total_rows``: the sum of their first dimensions.
    ``hash``: the content hash, 32 hex digits. ``creation_time``: free text. Since 1.0 also
    ``format_version`` (1) and ``meta``, the user's own JSON object, and, to locate damage,
    ``block_digests``, one for each ``block_bytes`` of ``B.dat`` (the last block shorter): since
    1.1 the xxh3_64 hexdigest of the little-endian uint64 xxh3_64 digests of the block's
    ``piece_bytes`` pieces (at most 1,000 blocks, pieces of 1 MiB); without ``piece_bytes`` (1.0),
    the xxh3_64 hexdigest of the block's bytes. Maps of picomap 0.1 lack these keys; they read as
    version 1 with ``{}`` and no block digests. Since 1.2, ``text``: ``"str"`` or ``"bytes"`` for
    a map of text items, each stored as its UTF-8 bytes (a bytes item as itself): dtype uint8, no
    trailing shape.

Sets. Dict items make a set at ``B``: ``B.json`` and, in the folder ``B.fields/BUILD``, one map
as above per field (``B.fields/BUILD/audio.dat`` ...), which opens on its own. ``B.json`` holds
``fields`` (each field's name mapped to its map's hash, in item 0's key order), ``build`` (12 hex
digits: the folder), ``count``, ``hash``, ``creation_time``, ``format_version`` and ``meta``. A
field's name is its map's file name: 1 to 100 of ``A-Za-z0-9_.-``, not starting with ``.`` or
``-``, not ending ``.dat``, ``.json`` or ``.starts.npy``; no two of a set's differ only in case.

Content hash. xxh3_128 (seed 0) over the byte stream ``b"D|v1|"``, then a frame for each item,
then ``b"D|end|"``; stored as ``hexdigest()``. An item's frame is its dtype's tag, its ndim as one
little-endian int64, its shape as little-endian int64s and its C-order bytes. The tag is
``b"A|v1|"`` and ``dtype.str`` in ASCII (``"<f4"``) where ``dtype.str`` names the dtype alone
(every plain numeric, bool, datetime, bytes, str and void dtype: picomap 0.1's frame), else
``b"A|v2|"``, the length of the json's ``dtype`` text as a little-endian int64 and that text
(structured dtypes, whose ``dtype.str`` is ``"|V8"`` whatever their fields, and ml_dtypes types).
A text map's stream ends ``b"D|str|end|"`` (or ``b"D|bytes|end|"``) instead, so its json's
``text`` is covered too. A set's hash is xxh3_128 over ``b"S|v1|"``, then for each field in name
order the length of its UTF-8 name as a little-endian int64, the name and the field's hash as 16
bytes, then ``b"S|end|"``. The hash depends only on the items: never on time, paths, the order of
a dict's keys or how the bytes were chunked.

A build writes uniquely named temporary files beside the map, fsyncs them, renames them into
place with the json last and fsyncs the folder, so a reader sees the old map or the new one. A
set's build writes its fields into a new ``BUILD`` folder, then renames its json into place: that
one rename commits every field at once. The fields it replaced are deleted after.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import glob
import io
import json
import math
import mmap
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
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import xxhash
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock; commits are still atomic per file
    fcntl = None

__version__ = "1.2.0"
__all__ = ["build_map", "MapWriter", "merge_maps", "verify_hash", "get_loader_fn", "update_hash_with_array",
           "MapLoader", "Sampler", "Mix", "map_files", "main"]

FORMAT_VERSION = 1
# A json bigger than this is refused before parsing: a damaged or hostile file must not exhaust memory.
MAX_JSON_BYTES = 64 << 20
# meta may take half of that; the rest is for picomap's own keys, block digests above all.
MAX_META_BYTES = MAX_JSON_BYTES // 2
# build_map copies items into a buffer of this many bytes, then writes and hashes them in one go:
# large enough that per-call overheads vanish, small enough to stay in cache and keep memory flat.
BATCH_BYTES = 1 << 20
# ... and at most this many items a batch, so that memory stays flat for items of no bytes too.
BATCH_ITEMS = 1 << 16
# Items under this many bytes on average are hashed by copying them, with their frame headers, into
# one buffer (cheaper than two Python calls an item); larger ones are fed to xxhash where they lie.
FRAME_COPY_BELOW = 1024
_MAP_HEAD, _MAP_TAIL, _ITEM_TAG, _ITEM_TAG_V2 = b"D|v1|", b"D|end|", b"A|v1|", b"A|v2|"
_SET_HEAD, _SET_TAIL = b"S|v1|", b"S|end|"
_REQUIRED_KEYS = ("trail_dim", "hash", "dtype", "count", "total_rows")
_EMPTY_LAYOUT = (np.dtype(np.float64), ())  # what a map of no items records; no item depends on it
_SUFFIXES = (".dat", ".starts.npy", ".json")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_TEXT_KINDS = {str: "str", bytes: "bytes"}  # what a text map's json may say its items are
# Names numpy knows only once ml_dtypes is imported (bfloat16, float8_e4m3fn, int4, ...).
_ML_DTYPE_NAME = re.compile(r"bfloat16|b?complex32|float[468]_e\w+|u?int[124]")
# os.copy_file_range moves at most this much per call, so that the progress bar moves too.
COPY_CHUNK_BYTES = 64 << 20
# So that verify_hash can say which items are damaged, a build digests each 1 MiB piece of the .dat
# and records the digests of at most MAX_BLOCKS blocks of whole pieces: damage is located to 1/1000
# of the map or 1 MiB, whichever is larger, and the json holds at most ~20 KB of digests.
PIECE_BYTES = 1 << 20
MAX_BLOCKS = 1000
# A loader checks the offsets of 2**CHECK_SHIFT items (128 KiB of them) the first time one of those
# items is loaded, rather than all of them at open: opening stays O(1) and the offsets stay shared.
CHECK_SHIFT = 14
# access="auto" reads a map cold (exactly each item's pages, no readahead around them) when its .dat
# is larger than this share of the memory the page cache may use: a map that fits is served from
# memory after its first pass, one that does not is read from disk again and again, and readahead
# around every random read would multiply the bytes read (by up to 2,000 here: 8 MiB for 4 KiB).
COLD_ABOVE = 0.5


# ---------------------------------------------------------------- paths and metadata

class MapFiles(NamedTuple):
    """The three files of one map."""
    dat: Path
    starts: Path
    json: Path


def map_files(path: str | os.PathLike) -> MapFiles:
    """The three files of the map at ``path``: its base (``"ds/train"``) or any of its files.

    One trailing ``.dat``, ``.starts.npy`` or ``.json`` is stripped, nothing else:
    ``"v1.2/train.v2"`` names ``v1.2/train.v2.dat`` etc.
    """
    base = os.fspath(path)
    if not isinstance(base, str):
        raise TypeError(f"picomap: path must be a str or os.PathLike of str, not {type(path).__name__}")
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    if os.path.basename(base) in ("", ".", ".."):
        raise ValueError(f"picomap: {os.fspath(path)!r} names a folder, not a map")
    return MapFiles(Path(base + ".dat"), Path(base + ".starts.npy"), Path(base + ".json"))


def _import_ml_dtypes(what: str, error: type[Exception]):
    """ml_dtypes, which registers bfloat16 and its kin with numpy; imported only when a map needs it."""
    try:
        import ml_dtypes
    except ImportError:
        raise error(f"{what} needs the ml_dtypes package: pip install ml_dtypes") from None
    return ml_dtypes


def _dtype_to_json(dtype: np.dtype) -> str | list:
    return np.lib.format.dtype_to_descr(dtype) if dtype.fields is not None else str(dtype)


def _dtype_from_json(value: Any, where: Path | str) -> np.dtype:
    if isinstance(value, str) and _ML_DTYPE_NAME.fullmatch(value):
        _import_ml_dtypes(f"{where}: dtype {value}", ValueError)
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
    try:
        same = _dtype_from_json(json.loads(json.dumps(_dtype_to_json(dtype))), where) == dtype
    except ValueError:  # titled, overlapping or out-of-order fields have no .npy descr to write
        same = False
    if not same:
        raise ValueError(f"{where}: dtype {dtype} cannot be recorded in a map's json (titled, overlapping or "
                         "out-of-order fields); use plain fields in order")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _is_build(name: Any) -> bool:
    """A set's build tag, which names its fields' folder: 12 lowercase hex digits."""
    return isinstance(name, str) and len(name) == 12 and _is_hex(name)


def _is_count(value: Any) -> bool:
    """A non-negative int that fits the int64/uint64 arithmetic numpy does with it."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


class Header(NamedTuple):
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

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.trail_dim)


class SetHeader(NamedTuple):
    """What a set's json says, checked."""
    fields: dict  # field name -> the hash its map's json must hold, in the items' key order
    build: str  # the folder, under NAME.fields, that holds this build's field maps
    count: int
    hash: str
    meta: dict


def _is_field_name(name: Any) -> bool:
    """A field's name is its map's file name: plain characters, and no suffix of a map's files."""
    return isinstance(name, str) and bool(_FIELD_NAME.fullmatch(name)) and not name.endswith(_SUFFIXES)


def _read_json(json_file: Path, handle) -> dict:
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{json_file}: {size} bytes is more than a picomap json may hold ({MAX_JSON_BYTES})")
    try:
        raw = json.loads(handle.read())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{json_file}: holds a JSON {type(raw).__name__}, not an object")
    return raw


def _check_keys(json_file: Path, raw: dict, required: tuple) -> tuple[str, dict]:
    """The checks a map's json and a set's share; returns the hash and meta."""
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{json_file}: missing key(s) {', '.join(missing)}")
    if not _is_count(raw["count"]):
        raise ValueError(f"{json_file}: count must be a non-negative integer, not {raw['count']!r}")
    digest = raw["hash"]
    if not (isinstance(digest, str) and len(digest) == 32 and _is_hex(digest)):
        raise ValueError(f"{json_file}: hash must be 32 lowercase hex digits, not {digest!r}")
    version = raw.get("format_version", 1)
    if not _is_count(version) or version > FORMAT_VERSION:
        raise ValueError(f"{json_file}: format_version {version!r} is not one this picomap "
                         f"({__version__}) reads; upgrade picomap")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{json_file}: meta must be a JSON object, not {type(meta).__name__}")
    return digest, meta


def _read_header(json_file: Path, raw: dict) -> Header:
    digest, meta = _check_keys(json_file, raw, _REQUIRED_KEYS)
    if not _is_count(raw["total_rows"]):
        raise ValueError(f"{json_file}: total_rows must be a non-negative integer, not {raw['total_rows']!r}")
    trail = raw["trail_dim"]
    if not isinstance(trail, list) or not all(_is_count(d) for d in trail):
        raise ValueError(f"{json_file}: trail_dim must be a list of non-negative integers, not {trail!r}")
    block_bytes, blocks = raw.get("block_bytes"), raw.get("block_digests")
    if (block_bytes is None) != (blocks is None) or blocks is not None and not (
            _is_count(block_bytes) and block_bytes > 0 and isinstance(blocks, list)
            and all(isinstance(b, str) and len(b) == 16 and _is_hex(b) for b in blocks)):
        raise ValueError(f"{json_file}: block_bytes must be a positive integer and block_digests a list of "
                         "16-hex-digit strings, both or neither")
    pieces = raw.get("piece_bytes")
    if pieces is not None and not (blocks is not None and _is_count(pieces) and pieces > 0
                                   and block_bytes % pieces == 0):
        raise ValueError(f"{json_file}: piece_bytes must be a positive integer that divides block_bytes")
    dtype, text = _dtype_from_json(raw["dtype"], json_file), raw.get("text")
    if text is not None and (text not in _TEXT_KINDS.values() or dtype != np.uint8 or trail):
        raise ValueError(f"{json_file}: text must be \"str\" or \"bytes\", and only for uint8 items of no "
                         f"trailing shape, not {text!r} for {dtype} {tuple(trail)}")
    return Header(dtype, tuple(trail), raw["count"], raw["total_rows"], digest, meta, block_bytes, blocks,
                  pieces, text)


def _read_set_header(json_file: Path, raw: dict) -> SetHeader:
    digest, meta = _check_keys(json_file, raw, ("fields", "build", "hash", "count"))
    fields, build = raw["fields"], raw["build"]
    if not (isinstance(fields, dict) and fields and all(
            _is_field_name(name) and isinstance(h, str) and len(h) == 32 and _is_hex(h) for name, h in fields.items())):
        raise ValueError(f"{json_file}: fields must map field names (letters, digits, _ . -) to 32-hex-digit "
                         "hashes")
    if not _is_build(build):
        raise ValueError(f"{json_file}: build must be 12 hex digits, not {build!r}")
    return SetHeader(fields, build, raw["count"], digest, meta)


def _map_file(handle) -> mmap.mmap:
    # From Python 3.13 a mapping need not keep a duplicate of the file descriptor: then an open
    # map holds no descriptor at all, however many are open.
    no_fd = {"trackfd": False} if sys.version_info >= (3, 13) else {}
    return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ, **no_fd)


def _map_starts(starts_file: Path, handle, header: Header) -> np.ndarray:
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
        starts = np.ndarray(shape, dtype, buffer=_map_file(handle), offset=offset).view(np.int64)
    else:  # another writer's integers: read and converted, O(N), since they cannot be mapped as int64
        starts = np.fromfile(handle, dtype, shape[0]).astype(np.int64)
        starts.flags.writeable = False
    if starts[0] != 0:
        raise ValueError(f"{starts_file}: the first offset is {starts[0]}, not 0")
    if starts[-1] != header.total_rows:
        raise ValueError(f"{starts_file}: the last offset is {starts[-1]} but the json says "
                         f"total_rows={header.total_rows}")
    return starts


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


def _checked_runs(starts: np.ndarray, where: Path):
    """Yield a map's offsets in runs of BATCH_ITEMS items (each run's last offset is the next one's
    first), each run checked: once the generator is exhausted every offset was."""
    for i in range(0, len(starts) - 1, BATCH_ITEMS):
        offsets = starts[i:i + BATCH_ITEMS + 1]
        _check_offsets(offsets, i, 0, int(starts[-1]), where)
        yield offsets


@contextlib.contextmanager
def _folder_lock(folder: Path, exclusive: bool):
    """Hold flock on the folder: a commit takes it exclusively, an opener shared, so no opener reads
    the json of one build with the data of another. Where flock is missing, go on without it."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _open_file(path: Path):
    """path opened for reading, if it is a regular file: never blocks on a FIFO or reads a device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (a map is three files side by side: "
                                "NAME.dat, NAME.starts.npy and NAME.json)") from None
    except IsADirectoryError:  # where a folder cannot be opened at all
        raise ValueError(f"{path}: a folder, not a map file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a folder, FIFO or device); a map is three regular files")
    return os.fdopen(fd, "rb")


def _map_rows(handle, files: MapFiles, header: Header) -> np.ndarray:
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
        return np.ndarray(shape, header.dtype, buffer=_map_file(handle))
    except ValueError as e:  # numpy's own message would not say which map
        raise ValueError(f"{files.json}: shape {shape} of {header.dtype} is not a valid array ({e})") from None


class OpenedMap(NamedTuple):
    files: MapFiles
    header: Header
    starts: np.ndarray  # int64, count + 1, mapped; only both ends checked
    data: np.ndarray  # read-only, mapped
    identity: tuple  # the mapped .dat's device, inode, size and mtime: the file, not its name


def _identity(handle) -> tuple:
    info = os.fstat(handle.fileno())
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class OpenedSet(NamedTuple):
    files: MapFiles  # only its json is the set's own file
    header: SetHeader
    fields: dict  # field name -> OpenedMap


def _fields_folder(files: MapFiles) -> Path:
    """The folder under which a set keeps each build's field maps: NAME.fields beside NAME.json."""
    return files.json.with_name(files.json.name.removesuffix(".json") + ".fields")


def _open(path: str | os.PathLike) -> OpenedMap | OpenedSet:
    """Open, check and map the map or set at path, in O(1) time and memory whatever its item count."""
    files = map_files(path)
    # one shared lock for all the files, the fields' too: a commit waits for it, so they are one build's
    with _folder_lock(files.json.parent, exclusive=False):
        with _open_file(files.json) as handle:
            raw = _read_json(files.json, handle)
        if "fields" in raw:
            return _open_set(files, _read_set_header(files.json, raw))
        header = _read_header(files.json, raw)
        with _open_file(files.starts) as handle:
            starts = _map_starts(files.starts, handle, header)
        with _open_file(files.dat) as handle:  # size check and mapping on one handle: one file, never two
            return OpenedMap(files, header, starts, _map_rows(handle, files, header), _identity(handle))


def _open_map(path: str | os.PathLike) -> OpenedMap:
    """_open for a single map: ValueError if path holds a set."""
    opened = _open(path)
    if isinstance(opened, OpenedSet):
        raise ValueError(f"{opened.files.json}: a set of fields, where a single map was expected")
    return opened


def _open_set(files: MapFiles, header: SetHeader) -> OpenedSet:
    folder = _fields_folder(files) / header.build
    fields = {}
    for name, digest in header.fields.items():
        field = _open_map(folder / name)
        if field.header.hash != digest or field.header.count != header.count:
            raise ValueError(f"{files.json}: field {name!r} ({field.files.json}) holds {field.header.count} items "
                             f"of hash {field.header.hash}, not the {header.count} of hash {digest} the set "
                             "records: it comes from another build")
        fields[name] = field
    return OpenedSet(files, header, fields)


# ---------------------------------------------------------------- atomic commit

def _claim(path: Path) -> int:
    """Create path (a new temporary name) and hold an exclusive flock on it while this process
    lives: that is how a later build tells a live build's temporaries from abandoned ones."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(e.errno, f"{path.parent}: cannot create files there (read-only?); "
                              "nothing was changed") from None
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _is_held(path: Path) -> bool:
    """Whether some process holds a flock on path (its build is alive)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _live_tags(files: MapFiles) -> tuple[set, dict]:
    """The tags of the builds of this map whose process is alive (it holds a flock on one of its
    temporaries), and of the abandoned ones (a SIGKILL, a power cut): (live, abandoned)."""
    found: dict[str, list[Path]] = {}
    for final in files:
        for temp in files.dat.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
            found.setdefault(temp.name[len(final.name) + 2:-len(".tmp")], []).append(temp)
    live = {tag for tag, temps in found.items() if any(_is_held(t) for t in temps)}
    return live, {tag: found[tag] for tag in found.keys() - live}


def _remove_abandoned(files: MapFiles) -> None:
    """Delete the temporaries of builds of this map whose process is gone; those of live builds
    keep their flock and are left alone. (A set's abandoned field folders go at its next commit.)"""
    if fcntl is None:  # no way to tell a live build from a dead one
        return
    for temps in _live_tags(files)[1].values():
        for temp in temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)


class _Staging:
    """One build's temporaries beside the map at ``files`` (and, for a set, its field folder):
    ``commit()`` renames them into place, json last; ``discard()`` removes them. Whatever map was at
    ``files`` is untouched until the commit, and replaced at once by it.

    A process killed outright leaves its temporaries; the next build of the same map removes them.
    """

    def __init__(self, files: MapFiles, is_set: bool):
        files.json.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(files)
        self.files, self.tag, self.is_set = files, secrets.token_hex(6), is_set
        self.temps = MapFiles(*(p.with_name(f".{p.name}.{self.tag}.tmp") for p in files))
        # held while this process lives: how a later build tells a live build's files from abandoned ones
        self.claim: int | None = _claim(self.temps.json if is_set else self.temps.dat)
        self.folder = _fields_folder(files) / self.tag if is_set else None  # the set's field maps

    def commit(self, header: dict) -> None:
        _write_json(self.temps.json, header)
        try:
            if self.is_set:  # the field maps' files were fsynced; now their names
                _fsync_folder(self.folder)
                _fsync_folder(self.folder.parent)
            renames = [(self.temps.json, self.files.json)] if self.is_set else zip(self.temps, self.files)
            with _folder_lock(self.files.json.parent, exclusive=True) as folder_fd:
                for temp, final in renames:
                    os.replace(temp, final)
                if folder_fd is not None:  # make the renames themselves durable
                    os.fsync(folder_fd)
                self._remove_replaced()
        except BaseException:
            self.discard()
            raise
        self._release()

    def _remove_replaced(self) -> None:
        """With the folder locked, delete what the map now at files no longer uses: a plain map's
        .dat and offsets if a set replaced it, and the field folders of every other build that is
        not alive (the one replaced, and those of builds killed after committing)."""
        if self.is_set:
            for stale in (self.files.dat, self.files.starts):
                with contextlib.suppress(OSError):
                    os.unlink(stale)
        folder = _fields_folder(self.files)
        if not folder.is_dir():
            return
        live = _live_tags(self.files)[0] if fcntl is not None else None
        for build in folder.iterdir():  # only folders named as builds name them: never a user's own
            if _is_build(build.name) and build.name != self.tag and live is not None and build.name not in live:
                shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(OSError):  # gone if empty, as when a plain map replaced a set
            folder.rmdir()

    def discard(self) -> None:
        for temp in self.temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # NAME.fields, if this build made it and nothing else is in it
                self.folder.parent.rmdir()
        self._release()

    def _release(self) -> None:
        if self.claim is not None:
            os.close(self.claim)
            self.claim = None


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _new_file(path: Path):
    """Yield the temporary path open for writing (from empty), then flush and fsync it."""
    with open(path, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _npy_header(count: int) -> bytes:
    """The .npy header np.save writes for ``count`` uint64 offsets: 128 bytes whatever the count,
    since numpy pads headers to a multiple of 64."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u8", "fortran_order": False, "shape": (count,)})
    return header.getvalue()


class _OffsetsFile:
    """Row offsets streamed into an open .npy file, so no process ever holds them all; the header,
    which holds their count, is written over its placeholder last."""

    def __init__(self, handle):
        self.handle, self.count, self.end = handle, 0, 0
        handle.write(_npy_header(0))
        self.append(np.zeros(1, np.int64))

    def append(self, offsets: np.ndarray) -> None:
        """Add offsets (int64, never decreasing, from self.end on)."""
        self.handle.write(offsets.astype("<u8"))
        self.count, self.end = self.count + len(offsets), int(offsets[-1])

    def finish(self) -> None:
        self.handle.seek(0)
        self.handle.write(_npy_header(self.count))
        self.handle.seek(0, os.SEEK_END)


def _write_json(path: Path, header: dict) -> None:
    with _new_file(path) as handle:
        handle.write(json.dumps(header).encode())


def _header_dict(dtype: np.dtype, trail: tuple, offsets: _OffsetsFile, digest: str, blocks, meta: dict,
                 text: str | None = None) -> dict:
    # The 0.1 keys first, with their 0.1 meanings, so a 0.1 reader still loads the map.
    header = {"trail_dim": list(trail), "hash": digest, "creation_time": _now(), "dtype": _dtype_to_json(dtype),
              "count": offsets.count - 1, "total_rows": offsets.end, "format_version": FORMAT_VERSION, "meta": meta,
              **blocks.grouped()}
    if text is not None:
        header["text"] = text
    return header


def _set_header_dict(fields: dict, build: str, meta: dict) -> dict:
    """A set's json, from its fields' jsons (in the items' key order)."""
    hashes = {name: field["hash"] for name, field in fields.items()}
    return {"fields": hashes, "build": build, "count": next(iter(fields.values()))["count"],
            "hash": _set_hash(hashes), "creation_time": _now(), "format_version": FORMAT_VERSION, "meta": meta}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- hashing

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


def _item_header(dtype: np.dtype, shape: tuple) -> bytes:
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
    h.update(_item_header(arr.dtype, arr.shape))
    h.update(_as_bytes(arr))
    return h


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

    def grouped(self, per_block: int | None = None) -> dict:
        """The json's keys: pieces grouped into at most MAX_BLOCKS blocks (or per_block pieces a block),
        a block's digest being the xxh3_64 of its pieces' digests as little-endian uint64s."""
        pieces = self.pieces()
        per_block = per_block or max(1, -(-len(pieces) // MAX_BLOCKS))
        digests = [xxhash.xxh3_64(np.array(pieces[k:k + per_block], "<u8").tobytes()).hexdigest()
                   for k in range(0, len(pieces), per_block)]
        return {"block_bytes": per_block * self.piece_bytes, "piece_bytes": self.piece_bytes,
                "block_digests": digests}


def _frame_headers(dtype: np.dtype, trail: tuple, lengths: np.ndarray) -> np.ndarray:
    """Every item's frame header as the rows of an (n, width) uint8 array; only the length differs."""
    headers = np.tile(np.frombuffer(_item_header(dtype, (0, *trail)), np.uint8), (len(lengths), 1))
    at = len(_dtype_tag(dtype)) + 8  # the first dimension follows the tag and ndim
    headers[:, at:at + 8] = lengths.astype("<i8").view(np.uint8).reshape(-1, 8)
    return headers


def _interleave(headers: np.ndarray, data: np.ndarray, lengths: np.ndarray, row_bytes: int) -> np.ndarray:
    """header 0, item 0's bytes, header 1, item 1's bytes, ... as one array, built by numpy."""
    n, width = headers.shape
    unit = np.dtype(f"u{math.gcd(width, row_bytes, 8)}")  # the widest unit every piece is made of
    counts = np.empty(2 * n, np.int64)
    counts[0::2], counts[1::2] = width // unit.itemsize, lengths * (row_bytes // unit.itemsize)
    is_data = np.repeat(np.tile([False, True], n), counts)
    framed = np.empty(len(is_data), unit)
    framed[is_data] = data.view(unit)
    framed[~is_data] = headers.view(unit).ravel()
    return framed


def _update_hash_with_items(h, rows: np.ndarray, lengths: np.ndarray) -> None:
    """Feed the frames of consecutive items into h: ``rows`` holds their rows back to back (C order),
    ``lengths`` their first dimensions. The same stream as update_hash_with_array on each item, in
    far fewer calls: small items are framed into one buffer, large ones are hashed in place."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) == 0:
        return
    headers, data = _frame_headers(rows.dtype, rows.shape[1:], lengths), _as_bytes(rows)
    row_bytes = rows.dtype.itemsize * math.prod(rows.shape[1:])
    if data.nbytes < FRAME_COPY_BELOW * len(lengths):
        h.update(_interleave(headers, data, lengths, row_bytes))
        return
    update, width = h.update, headers.shape[1]
    heads, body, start = memoryview(headers.reshape(-1)), memoryview(data), 0
    for k, end in enumerate(np.cumsum(lengths * row_bytes).tolist()):
        update(heads[k * width:(k + 1) * width])
        update(body[start:end])
        start = end


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


def _is_inexact(dtype: np.dtype) -> bool:
    """Floating or complex, numpy's own or ml_dtypes' (bfloat16, float8_*, ...)."""
    return dtype.kind in "fc" or dtype.kind == "V" and str(dtype).startswith(("bfloat", "float", "complex"))


def _converted(index: int, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """arr as dtype, if every value fits: exactly for integer and other targets, and for floating
    ones without overflow (rounding is what a float target is for). ValueError naming the item else."""
    if arr.dtype == dtype:
        return arr
    with np.errstate(all="ignore"):
        try:
            out = arr.astype(dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"item {index}: {arr.dtype} values cannot become {dtype} ({e})") from None
        if np.can_cast(arr.dtype, dtype, "safe"):
            return out
        back = out.astype(arr.dtype)
        fits = (np.isfinite(back) | ~np.isfinite(arr)) if _is_inexact(dtype) and _is_inexact(arr.dtype) \
            else back == arr
    if not np.all(fits):
        value = arr[~fits].flat[0].item()
        raise ValueError(f"item {index}: the value {value!r} does not fit {dtype} (picomap never wraps or clips)")
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


class _ItemWriter:
    """Streams items to a map's .dat and .starts.npy (at ``files``) in batches, hashing as it goes.

    Each item's bytes are copied into the batch when it is added, before the caller makes the next
    one: a source that refills one buffer for every item is stored as it yielded each item."""

    def __init__(self, files: MapFiles, dtype: np.dtype | None):
        self.files, self.dat = files, open(files.dat, "wb")
        self.starts = open(files.starts, "wb")
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
        """A str's UTF-8 bytes, or a bytes' own, as uint8; item 0 decides whether the map holds text."""
        kind = _TEXT_KINDS.get(type(item))
        if self.dtype is None and self.text is None:
            if self.target is not None:
                raise ValueError(f"item {index}: text, but dtype={self.target} was asked; text is stored as "
                                 "its UTF-8 bytes")
            self.text = kind
        if kind is None or kind != self.text:
            raise ValueError(f"item {index}: {type(item).__name__}, but this map's items are "
                             f"{self.text or 'arrays'} (fixed by item 0)")
        try:
            return np.frombuffer(item.encode() if kind == "str" else item, np.uint8)
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
        if self.lengths:
            shape = (sum(self.lengths), *self.trail)
            rows = np.frombuffer(self.batch, self.dtype).reshape(shape) if self.batch else np.empty(shape, self.dtype)
            self._write(rows, self.lengths)
        self.batch, self.lengths = bytearray(), []

    def _write(self, rows: np.ndarray, lengths: list) -> None:
        lengths = np.asarray(lengths, np.int64)
        data = _as_bytes(rows)
        self.dat.write(data)
        self.blocks.update(data)
        _update_hash_with_items(self.hash, rows, lengths)
        self.offsets.append(np.cumsum(lengths) + self.offsets.end)

    def finish(self, meta: dict) -> dict:
        """Write what is left, fsync and close both files; return the map's json (not yet written)."""
        if self.dtype is None:  # no item, or only empty lists: dtype= or numpy's float64, like np.asarray([])
            self._fix_layout(0, np.empty(0, np.uint8 if self.text else self.target or _EMPTY_LAYOUT[0]))
        self.flush()
        self.offsets.finish()
        for handle in (self.dat, self.starts):
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        self.hash.update(_map_tail(self.text))
        return _header_dict(self.dtype, self.trail, self.offsets, self.hash.hexdigest(), self.blocks, meta, self.text)

    def close(self) -> None:
        self.dat.close()
        self.starts.close()


class _SetWriter:
    """Streams dict items to one map per field in ``folder``; item 0 fixes the fields."""

    def __init__(self, folder: Path, first: dict, dtypes: dict):
        if not first:
            raise ValueError("item 0: a dict of no fields; a set needs at least one")
        by_case = {}
        for name in first:
            if not _is_field_name(name):
                raise ValueError(f"item 0: field name {name!r} cannot name its map's files: use at most 100 "
                                 "letters, digits, _, - and . (not first), not ending .dat, .json or .starts.npy")
            other = by_case.setdefault(name.lower(), name)  # macOS and Windows would put both in one file
            if other != name:
                raise ValueError(f"item 0: fields {other!r} and {name!r} differ only in case, which some file "
                                 "systems do not tell apart; rename one")
        unknown = dtypes.keys() - first.keys()
        if unknown:
            raise ValueError(f"dtype= names field(s) {sorted(unknown)} that item 0 lacks (it has {list(first)})")
        folder.mkdir(parents=True)
        self.folder, self.writers = folder, {}
        for name in first:
            self.writers[name] = _ItemWriter(map_files(folder / name), dtypes.get(name))

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
        """Write every field's map, json included; return the set's json (not yet written)."""
        fields = {}
        for name, writer in self.writers.items():
            fields[name] = writer.finish({})
            _write_json(writer.files.json, fields[name])
        return _set_header_dict(fields, self.folder.name, meta)

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
    if len(text) > MAX_META_BYTES:
        raise ValueError(f"{function}: meta takes {len(text)} bytes of JSON, more than a map's json "
                         f"keeps for it ({MAX_META_BYTES}); store large things in a file beside the map")
    return json.loads(text)


def _checked_dtype(dtype, where: str) -> np.dtype | dict | None:
    """dtype= as np.dtype, or for items with fields a dict of field name to np.dtype; checked."""
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {name: _checked_dtype(value, f"{where} for field {name!r}") for name, value in dtype.items()}
    dtype = np.dtype(dtype)
    _check_layout(dtype, where)
    return dtype


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
    committed with an item missing. ``len(writer)`` is the count of items appended.
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

    def append(self, item) -> None:
        """Add one item: an array (or array-like, CPU torch tensor), a str or bytes, or a dict of those."""
        if self._items is None:
            self._start(isinstance(item, dict), item)
        try:
            self._items.add(self._count, item)
        except BaseException as e:
            self.discard()
            self._error = f"{type(e).__name__} at item {self._count}"
            raise
        self._count += 1
        if self._bar is not None:  # as tqdm's own loop does: the bar only moves every miniters items
            self._unshown += 1
            if self._unshown >= self._bar.miniters:
                self._bar.update(self._unshown)
                self._unshown = 0

    def _start(self, is_set: bool, first) -> None:
        if self.header is not None or self._error is not None:
            raise ValueError(f"MapWriter({os.fspath(self._files.json)!r}): already "
                             f"{'committed' if self.header is not None else 'discarded (' + self._error + ')'}")
        if is_set != isinstance(self._dtype, dict) and self._dtype is not None:
            raise TypeError(f"item 0: dtype= must be a dict of field names to dtypes for items with fields, and "
                            f"a single dtype for others, not {self._dtype!r}")
        self._staging = staging = _Staging(self._files, is_set)
        self._dropped = weakref.finalize(self, staging.discard)  # a writer dropped unclosed commits nothing
        try:
            self._items = _SetWriter(staging.folder, first, self._dtype or {}) if is_set else \
                _ItemWriter(staging.temps, self._dtype)
        except BaseException:
            self.discard()
            raise

    def close(self) -> dict:
        """Commit: write what is left and put the map in place at once; return its json."""
        if self.header is not None:
            return self.header
        if self._items is None:
            # no item: an empty map, even where dtype= named fields; merge_maps takes it beside sets
            if isinstance(self._dtype, dict):
                self._dtype = None
            self._start(False, None)
        try:
            header = self._items.finish(self._meta)
            self._staging.commit(header)
        except BaseException:
            self.discard()
            raise
        self._dropped.detach()
        self._close_bar()
        self.header, self._items, self._staging = header, None, None
        return header

    def discard(self) -> None:
        """Remove everything written; a map already at the path stays as it was."""
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
    one dtype), which ``merge_maps`` takes beside sets too. ``dtype`` (anything ``np.dtype`` takes;
    for dicts, a dict of field names to those) converts every item to it: a value that does not fit
    (out of an integer's range, a fraction for an integer, an overflow to infinity) raises
    ValueError naming the item, never wraps. ``meta`` is a JSON-serialisable dict of your own,
    stored under ``"meta"``. The folder is created if missing. ``MapWriter`` does the same for
    items pushed one at a time.

    Raises ValueError (naming the item, and the field) for a 0-d item, one whose dtype or trailing
    shape differs, a missing or extra field, or a dtype a json cannot record; TypeError for object
    dtypes. On any failure, Ctrl-C included, no file is left behind and a map already at ``path``
    is untouched; on success the new files replace it at once. Memory: one batch (``BATCH_BYTES``,
    ``BATCH_ITEMS``) a field, whatever the count.
    """
    with MapWriter(path, progress=progress, meta=meta, dtype=dtype) as writer:
        for item in items:
            writer.append(item)
    return writer.header


class _Shard(NamedTuple):
    files: MapFiles
    header: Header
    identity: tuple

    @property
    def where(self) -> Path:
        return self.files.dat


class _SetShard(NamedTuple):
    files: MapFiles
    header: SetHeader
    fields: dict  # field name -> _Shard

    @property
    def where(self) -> Path:
        return self.files.json


def _checked_shards(paths: Iterable, target: MapFiles, meta: dict | None) -> tuple[list, dict]:
    """The shards at paths, checked one at a time (their files closed again, so a merge of thousands
    holds one open) and kept as only what merging needs: files, layout and identity, not their meta
    or block digests, which may be megabytes a shard. Returns them and the merged meta: ``meta`` if
    given, else the shards' own, which must then agree (ValueError naming the first that differs)."""
    shards, first_meta = [], {}
    for k, path in enumerate(paths):
        opened = _open(path)
        if _same_file(opened.files.dat, target.dat) or _same_file(opened.files.json, target.json):
            raise ValueError(f"merge_maps: out ({target.dat}) is shard {k}; merge into a new path")
        if isinstance(opened, OpenedSet):
            fields = {name: _Shard(field.files, field.header._replace(block_digests=None), field.identity)
                      for name, field in opened.fields.items()}
            shard = _SetShard(opened.files, opened.header._replace(meta={}), fields)
        else:
            shard = _Shard(opened.files, opened.header._replace(meta={}, block_digests=None), opened.identity)
        if k == 0:
            first_meta = opened.header.meta
        elif meta is None and opened.header.meta != first_meta:
            shown = [json.dumps(m)[:80] for m in (opened.header.meta, first_meta)]
            raise ValueError(f"merge_maps: shard {k} ({shard.where}) has meta {shown[0]}, but shard 0 "
                             f"has {shown[1]}; pass meta= to say what the merged map's is")
        shards.append(shard)
    return shards, first_meta if meta is None else meta


def _shared_layout(shards: list[_Shard]) -> tuple[np.dtype, tuple, str | None]:
    """The dtype, trailing shape and text every shard with items agrees on; empty shards do not count."""
    with_items = [(k, s) for k, s in enumerate(shards) if s.header.count]
    if not with_items:
        return (*_EMPTY_LAYOUT, None)
    first_k, first = with_items[0]
    theirs = first.header
    for k, shard in with_items[1:]:
        mine = shard.header
        if (mine.dtype, mine.trail_dim, mine.text) != (theirs.dtype, theirs.trail_dim, theirs.text):
            raise ValueError(f"merge_maps: shard {k} ({shard.files.dat}) holds {mine.text or mine.dtype.str} items of "
                             f"trailing shape {mine.trail_dim}, but shard {first_k} ({first.files.dat}) holds "
                             f"{theirs.text or theirs.dtype.str} of {theirs.trail_dim}")
    return theirs.dtype, theirs.trail_dim, theirs.text


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def _copy_into(source: OpenedMap, target, bar: tqdm) -> None:
    """Append the shard's .dat to the open target, by the kernel where it can; the source must be
    the very file that was checked when the shard was opened."""
    with _open_file(source.files.dat) as handle:
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


def _append_shard(shard: _Shard, dat, offsets: _OffsetsFile, bar: tqdm) -> None:
    """Append a shard's offsets (checked, shifted by the rows before it) and its data."""
    opened = _open_map(shard.files.dat)
    if opened.identity != shard.identity:
        raise ValueError(f"{shard.files.dat}: changed while merging; nothing was written")
    rows_before = offsets.end
    for run in _checked_runs(opened.starts, opened.files.starts):
        offsets.append(run[1:] + rows_before)
    _copy_into(opened, dat, bar)


def _shared_fields(shards: list) -> list | None:
    """The fields every set among the shards has, in the first one's order (None: no shard is a set);
    ValueError naming a shard that differs. An empty single map, what a build of no items writes,
    goes with sets too."""
    sets = [(k, shard) for k, shard in enumerate(shards) if isinstance(shard, _SetShard)]
    if not sets:
        return None
    first_k, names = sets[0][0], list(sets[0][1].header.fields)
    for k, shard in enumerate(shards):
        mine = list(shard.header.fields) if isinstance(shard, _SetShard) else None
        if mine is None and shard.header.count == 0:
            continue
        if mine is None or set(mine) != set(names):
            raise ValueError(f"merge_maps: shard {k} ({shard.where}) has " + (f"fields {mine}" if mine else "no fields")
                             + f", but shard {first_k} has fields {names}")
    return names


def _merge_into(shards: list[_Shard], files: MapFiles, meta: dict, bar: tqdm) -> dict:
    """Write the shards' items, in order, to files' .dat and .starts.npy; return the json (not written)."""
    dtype, trail, text = _shared_layout(shards)
    merged = Header(dtype, trail, sum(s.header.count for s in shards), sum(s.header.total_rows for s in shards),
                    "", meta)
    with _new_file(files.dat) as dat, _new_file(files.starts) as starts:
        offsets = _OffsetsFile(starts)
        for shard in shards:
            _append_shard(shard, dat, offsets, bar)
        offsets.finish()
    # hash what landed in the files, not what we meant to write
    with open(files.starts, "rb") as starts, open(files.dat, "rb") as dat:
        written_starts, written = _map_starts(files.starts, starts, merged), _map_rows(dat, files, merged)
    blocks = _BlockDigests(PIECE_BYTES)
    digest = _compute_hash(written_starts, written, merged.row_bytes, files.starts, bar, blocks, text)
    return _header_dict(dtype, trail, offsets, digest, blocks, meta, text)


def merge_maps(paths: Iterable, out: str | os.PathLike, *, progress: bool = True, meta: dict | None = None) -> dict:
    """Concatenate the maps (or sets) at ``paths``, in order, into a new one at ``out``; return the json written.

    The result is byte for byte what ``build_map`` writes for all their items in that order (same
    ``.dat``, offsets and hash, field by field for sets), so a dataset's hash does not depend on how
    it was sharded. Its ``meta`` is ``meta`` if given, else the shards' own, which must then be the
    same. Shards with items must agree on dtype, trailing shape and text, and sets on their fields
    (in the first set's order); empty shards may record any layout, and an empty map goes with sets.

    Raises ValueError naming the shard on a mismatch (of layout, fields, or of meta without
    ``meta=``), if ``out`` is one of ``paths``, or if a shard is inconsistent (FileNotFoundError if
    missing); nothing is written then. The bytes are copied by the kernel where possible and the
    hash is computed from what was written. Each shard's files are checked for consistency, not
    re-hashed: run verify_hash on a shard you do not trust. Same crash safety as build_map.
    Memory: about a kilobyte a shard and one batch; one shard open at a time.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"merge_maps: paths must be a list of maps, not the single path {paths!r}")
    target = map_files(out)
    given_meta = None if meta is None else _checked_meta(meta, "merge_maps")
    shards, meta = _checked_shards(paths, target, given_meta)
    names = _shared_fields(shards)
    sets = [shard for shard in shards if isinstance(shard, _SetShard)]
    parts = {None: shards} if names is None else {name: [s.fields[name] for s in sets] for name in names}
    total_bytes = sum(s.header.total_rows * s.header.row_bytes for part in parts.values() for s in part)
    staging = _Staging(target, is_set=names is not None)
    try:
        with tqdm(total=2 * total_bytes, desc=f"merge {target.dat.name}", unit="B", unit_scale=True,
                  disable=not progress) as bar:
            if names is None:
                header = _merge_into(shards, staging.temps, meta, bar)
            else:
                staging.folder.mkdir(parents=True)
                fields = {}
                for name, part in parts.items():
                    field_files = map_files(staging.folder / name)
                    fields[name] = _merge_into(part, field_files, {}, bar)
                    _write_json(field_files.json, fields[name])
                header = _set_header_dict(fields, staging.tag, meta)
        staging.commit(header)
    except BaseException:
        staging.discard()
        raise
    return header


# ---------------------------------------------------------------- reading

def _batches(starts: np.ndarray, row_bytes: int, batch_bytes: int = BATCH_BYTES * 4):
    """Split items into consecutive ranges (i, j) of about batch_bytes each, at least one item and
    at most BATCH_ITEMS. Offsets need not be checked yet: any values give ranges that cover all items."""
    rows_per_batch = max(1, batch_bytes // max(row_bytes, 1))
    count, i = len(starts) - 1, 0
    while i < count:
        end_row = min(int(starts[i]) + rows_per_batch, 2**63 - 1)
        j = i - 1 + int(np.searchsorted(starts[i:i + BATCH_ITEMS + 1], end_row, side="right"))
        j = min(max(j, i + 1), count, i + BATCH_ITEMS)
        yield i, j
        i = j


def _compute_hash(starts: np.ndarray, data: np.ndarray, row_bytes: int, where: Path, bar: tqdm,
                  blocks: _BlockDigests | None = None, text: str | None = None) -> str:
    """The content hash of the items data[starts[i]:starts[i+1]], checking every offset on the way
    (ValueError naming ``where``); also feeds the data to blocks."""
    h = xxhash.xxh3_128(_MAP_HEAD)
    for i, j in _batches(starts, row_bytes):
        offsets = starts[i:j + 1]
        _check_offsets(offsets, i, 0, len(data), where)
        a, b = int(offsets[0]), int(offsets[-1])
        _update_hash_with_items(h, data[a:b], np.diff(offsets))
        if blocks is not None:
            blocks.update(_as_bytes(data[a:b]))
        bar.update((b - a) * row_bytes)
    h.update(_map_tail(text))
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


def verify_hash(path: str | os.PathLike, *, progress: bool = True) -> bool:
    """Recompute the content hash of the map (or set) at ``path``; return True if it matches the json.

    Raises ValueError on a mismatch, naming both hashes and, for maps with block digests (all
    but picomap 0.1's), the damaged items, or saying that the offsets or the json disagree when
    every block of the ``.dat`` is intact; for a set, naming the field. Raises ValueError or
    FileNotFoundError if the files are inconsistent or missing, offsets that decrease anywhere
    included. Cost: reads every byte of the map once; memory: one batch, whatever the count.
    It detects accidental damage; it is not a signature against deliberate tampering.
    """
    opened = _open(path)
    if isinstance(opened, OpenedMap):
        return _verify_map(opened, progress)
    files, header, fields = opened
    if _set_hash(header.fields) != header.hash:
        raise ValueError(f"{files.json}: hash mismatch: the json says {header.hash}, its fields' hashes make "
                         f"{_set_hash(header.fields)}; the json's fields were changed")
    for name, field in fields.items():
        try:
            _verify_map(field, progress)
        except ValueError as e:
            raise ValueError(f"{files.json}: field {name!r}: {e}") from None
    return True


def _verify_map(opened: OpenedMap, progress: bool) -> bool:
    files, header, starts, data, _ = opened
    with tqdm(total=data.nbytes, desc=f"verify {files.dat.name}", unit="B", unit_scale=True,
              disable=not progress) as bar:
        computed = _compute_hash(starts, data, header.row_bytes, files.starts, bar, text=header.text)
    if computed == header.hash:
        return True
    message = f"{files.json}: hash mismatch: the json says {header.hash}, the data hashes to {computed}"
    if header.block_digests is None:
        raise ValueError(f"{message}; {files.dat.name} or {files.starts.name} is damaged or was changed")
    # only now, a second pass, to locate the damage: the blocks digested as the json says they were
    blocks = _BlockDigests(header.piece_bytes or header.block_bytes)
    blocks.update(_as_bytes(data))
    found = blocks.grouped(header.block_bytes // header.piece_bytes)["block_digests"] if header.piece_bytes \
        else [f"{digest:016x}" for digest in blocks.pieces()]  # 1.0: each block's bytes digested whole
    if len(found) != len(header.block_digests):
        raise ValueError(f"{message}; the json lists {len(header.block_digests)} block digests where "
                         f"{files.dat.name} has {len(found)} blocks")
    bad = [k for k, (a, b) in enumerate(zip(found, header.block_digests)) if a != b]
    if not bad:
        raise ValueError(f"{message}; every block of {files.dat.name} is intact, so {files.starts.name} or the "
                         "json's dtype, trail_dim or text differ from what was built")
    items = _damaged_items(starts, header.row_bytes, bad, header.block_bytes)
    raise ValueError(f"{message}; {files.dat.name} is damaged in {len(bad)} block(s) of {header.block_bytes} "
                     f"bytes, holding items {items}: rebuild those")


class MapLoader:
    """Item access to an opened map; ``get_loader_fn`` returns one as ``load``.

    ``load(i)`` is item i as a read-only view into the mapped ``.dat`` (no copy, no I/O until its
    bytes are touched); ``load(i, copy=True)`` a private writable copy. Indices follow Python:
    negative ones count from the end, numpy integers work, out of range raises IndexError, a float
    or str raises TypeError. Cost: O(1), about as much as slicing an ndarray.

    Opening reads no offsets: the loader maps them, so every process that opens a map shares one
    copy of them, and checks them 16,384 items at a time, the first time one of those items is
    loaded. An item whose offsets are damaged raises ValueError naming the file and the item; no
    item is ever served that lies outside the data or overlaps another.

    ``close()`` (or a ``with`` block) lets go of the files: later calls raise ValueError, and the
    mappings are released once no view from them is alive.

    For a map of text, ``load(i)`` is a new ``str`` (or ``bytes``). For a set, it is a dict of
    its fields' items (``copy=True`` copies each); ``load.fields`` holds each field's own loader,
    and ``dtype``, ``trail_dim``, ``lengths``, ``starts``, ``data`` and ``access`` are dicts by field.
    """
    # Slots make load(i)'s attribute reads measurably cheaper; a __getattr__ here would undo that.
    __slots__ = ("_files", "_header", "_first", "_count", "_starts", "_data", "_begins", "_ends", "_chunks",
                 "_ready", "_checked", "_lock", "_lengths", "_rebased")

    def __new__(cls, path: str | os.PathLike | None = None, access: str = "auto"):
        # Opening happens here, since what it finds picks the class that serves the map (a set's, a
        # text map's, a cold one's), so that load(i) of a plain cached map stays as it is.
        # (Unpickling calls this with no path: the pickled class is kept, and with it the choice.)
        if path is None:
            return super().__new__(cls)
        return _loader(_open(path), access)

    def __init__(self, path: str | os.PathLike, access: str = "auto"):
        pass  # opened by __new__

    def _serve(self, files: MapFiles, header: Header, data: np.ndarray, starts: np.ndarray, first: int) -> None:
        """Serve the items whose offsets are ``starts`` (both ends checked), the first being item
        ``first`` of the map."""
        self._files, self._header, self._data, self._starts = files, header, data, starts
        self._first, self._count, self._rebased = first, len(starts) - 1, None
        # memoryviews index to Python ints fast and allocate nothing per item
        self._begins, self._ends = memoryview(starts)[:-1], memoryview(starts)[1:]
        # A flag a chunk, set once its offsets are checked, then as many again never set: twice, a
        # list for load(i) (CPython indexes lists fastest) and bytes to search for the nearest set.
        self._chunks = -(-self._count >> CHECK_SHIFT)
        self._ready, self._checked = [False] * (2 * self._chunks + 1), bytearray(2 * self._chunks + 1)
        self._lock, self._lengths = threading.Lock(), None

    def __call__(self, i, copy: bool = False) -> np.ndarray:
        try:
            if self._ready[i >> CHECK_SHIFT]:
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

    def _load_checking(self, i: int) -> np.ndarray:
        """load(i) the first time an item of its chunk is loaded, and for every negative i: the flags
        past the chunks' own are never set, so that i >> CHECK_SHIFT never finds another chunk's."""
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
        """Check the offsets of item i's chunk, and that they fit between the nearest checked chunks
        on either side: so all items served, before and after, keep to the data and to themselves."""
        with self._lock:
            checked, chunk = self._checked, i >> CHECK_SHIFT
            first, end = chunk << CHECK_SHIFT, min((chunk + 1) << CHECK_SHIFT, self._count)
            left, right = checked.rfind(1, 0, chunk), checked.find(1, chunk + 1, self._chunks)
            low = int(self._starts[(left + 1) << CHECK_SHIFT if left >= 0 else 0])
            high = int(self._starts[right << CHECK_SHIFT if right >= 0 else -1])
            try:
                _check_offsets(self._starts[first:end + 1], self._first + first, low, high, self._files.starts)
            except ValueError as e:
                raise ValueError(f"{e}: item {self._first + i} is not served; verify_hash tells more") from None
            checked[chunk], self._ready[chunk] = 1, True

    def _slice_range(self, items: slice) -> tuple[int, int]:
        """The items a..b-1 that ``items`` names, a <= b; ValueError unless its step is 1."""
        first, end, step = items.indices(self._count)
        if step != 1:
            raise ValueError(f"{self.path}: only contiguous slices of a map (step 1), not step {step}; "
                             "torch.utils.data.Subset takes any indices")
        return first, max(first, end)

    def _sliced(self, items: slice) -> MapLoader:
        """``load[a:b]``: a loader of items a..b-1, sharing this one's mappings (no copy)."""
        first, end = self._slice_range(items)
        starts = self._starts[first:end + 1]
        low, high = int(starts[0]), int(starts[-1])
        if not 0 <= low <= high <= self._header.total_rows:
            raise ValueError(f"{self._files.starts}: items {self._first + first}-{self._first + end - 1} run from "
                             f"row {low} to {high}, outside 0-{self._header.total_rows}")
        part = type(self).__new__(type(self))
        part._serve(self._files, self._header, self._data, starts, self._first + first)
        return part

    def _closed(self) -> Exception:
        return ValueError(f"{self.path}: the loader is closed")

    def _is_closed(self) -> bool:
        return self._data is None

    def _index_error(self, i) -> Exception:
        if self._is_closed():
            return self._closed()
        try:
            operator.index(i)
        except TypeError:
            return TypeError(f"{self.path}: item indices must be integers, not {type(i).__name__}")
        return IndexError(f"{self.path}: item {i} is out of range for a map of {self._count} items")

    __getitem__ = __call__

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        for i in range(self._count):
            yield self(i)

    def __getitems__(self, indices) -> list:
        """Many items at once: PyTorch's DataLoader fetches a whole batch with one call."""
        return [self(i) for i in indices]

    def close(self) -> None:
        """Let go of the map's files: calls after this raise ValueError. Views already handed out
        stay valid; the mappings are released when the last of them is gone."""
        self._data = self._starts = self._lengths = self._rebased = None
        self._begins = self._ends = memoryview(b"")
        self._ready, self._checked = [], bytearray()

    def __enter__(self) -> MapLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_array(self, name: str):
        array = getattr(self, name)
        if array is None:
            raise self._closed()
        return array

    @property
    def access(self) -> str:
        """How items are read: ``"cached"`` (a plain mapping) or ``"cold"`` (exactly each item's pages)."""
        return "cached"

    @property
    def path(self) -> Path:
        """The map's base path (its files are this plus .dat, .starts.npy, .json)."""
        return self._files.json.with_name(self._files.json.name.removesuffix(".json"))

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
    def hash(self) -> str:
        return self._header.hash

    @property
    def meta(self) -> dict:
        """The ``meta`` given to build_map, a new copy each time: changing it changes nothing else."""
        return copy.deepcopy(self._header.meta)

    @property
    def data(self) -> np.ndarray:
        """The items' rows as one read-only mapped array of shape ``(rows, *trail_dim)``: the whole
        ``.dat``, or for a slice of a map its items' rows. No copy."""
        starts = self._open_array("_starts")
        return self._data if self._count == self._header.count else self._data[starts[0]:starts[-1]]

    @property
    def starts(self) -> np.ndarray:
        """The ``N + 1`` row offsets into ``data`` as a read-only int64 array, mapped from the file
        as they are (``load(i)`` checks those it uses, ``verify_hash`` all): no copy, no cost. For a
        slice of a map, offsets from its first row: computed on first use, 8 bytes an item."""
        starts = self._open_array("_starts")
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
            starts = self._open_array("_starts")
            for _ in _checked_runs(starts, self._files.starts):
                pass
            self._checked[:self._chunks], self._ready[:self._chunks] = b"\1" * self._chunks, [True] * self._chunks
            lengths = np.diff(starts)
            lengths.flags.writeable = False
            self._lengths = lengths
        return self._lengths

    def __getstate__(self) -> dict:
        # the absolute path, identity and items only: a receiver maps the files itself, whatever
        # the map's size, from whatever folder it runs in
        return {"path": os.path.abspath(self.path), "hash": self.hash,
                "items": [self._first, self._first + self._count]}

    def __setstate__(self, state: dict) -> None:
        files, header, starts, data, _ = _reopened(state, _open_map(state["path"]))
        self._serve(files, header, data, starts, first=0)
        first, end = state["items"]
        if (first, end) != (0, self._count):
            self._serve(files, header, data, self._sliced(slice(first, end))._starts, first)

    def __repr__(self) -> str:
        items = f"{self._count} items" if self._first == 0 and self._count == self._header.count else \
            f"items {self._first}-{self._first + self._count - 1} ({self._count})"
        return f"<picomap.MapLoader {os.fspath(self.path)!r}: {items} of {self._layout()}>"

    def _layout(self) -> str:
        """What its items are: 'float32 (*, 2)', or 'str' or 'bytes' for text."""
        return self._header.text or f"{self.dtype} ({', '.join(map(str, ('*', *self.trail_dim)))})"


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


class _ColdMapLoader(MapLoader):
    """A MapLoader for a map larger than memory. Its mapping is advised MADV_RANDOM, so that no
    read brings in pages around it, and each load asks for exactly its item's pages with one
    madvise(MADV_WILLNEED); ``__getitems__`` asks once for each run of adjacent items, so a batch
    of a block-shuffled pass costs about one sequential read. Views stay views."""
    __slots__ = ()

    def _serve(self, files, header, data, starts, first) -> None:
        super()._serve(files, header, data, starts, first)
        if data.nbytes:
            data.base.madvise(mmap.MADV_RANDOM)

    def __call__(self, i, copy: bool = False) -> np.ndarray:
        item = MapLoader.__call__(self, i)
        if not isinstance(item, np.ndarray):  # load[a:b]: a loader, cold like this one
            return item
        if item.nbytes:
            self._fetch([self._bytes_of(i)])
        return item.copy() if copy else item

    __getitem__ = __call__

    def __getitems__(self, indices) -> list:
        items = [MapLoader.__call__(self, i) for i in indices]
        self._fetch(sorted(self._bytes_of(i) for i, item in zip(indices, items) if item.nbytes))
        return items

    def _bytes_of(self, i: int) -> tuple[int, int]:
        """Where item i's bytes lie in the .dat: (start, end)."""
        i = operator.index(i)
        i += self._count if i < 0 else 0
        return self._begins[i] * self._header.row_bytes, self._ends[i] * self._header.row_bytes

    def _fetch(self, spans: list) -> None:
        """One madvise(MADV_WILLNEED) for each run of spans (sorted) no more than a page apart."""
        mapping, page = self._data.base, mmap.PAGESIZE
        run_start, run_end = None, None
        for start, end in spans + [(None, None)]:
            if start is not None and run_end is not None and start <= run_end + page:
                run_end = max(run_end, end)
                continue
            if run_start is not None:
                aligned = run_start - run_start % page
                mapping.madvise(mmap.MADV_WILLNEED, aligned, run_end - aligned)
            run_start, run_end = start, end

    @property
    def access(self) -> str:
        return "cold"


class _TextLoader(MapLoader):
    """A MapLoader for a map of text: ``load(i)`` is a new str (or bytes) of the item's bytes."""
    __slots__ = ("_bytes",)  # the .dat as a memoryview, which slices in half the time an ndarray does

    def _serve(self, files, header, data, starts, first) -> None:
        super()._serve(files, header, data, starts, first)
        self._bytes = memoryview(data)

    def __call__(self, i, copy: bool = False) -> str | bytes | MapLoader:
        try:  # the fast path of MapLoader.__call__, on the memoryview
            raw = self._bytes[self._begins[i]:self._ends[i]] if self._ready[i >> CHECK_SHIFT] else None
        except (IndexError, TypeError):
            raw = None
        if raw is None:  # a chunk's first load, a negative index, a slice or an error: as MapLoader does
            raw = MapLoader.__call__(self, i)
            if not isinstance(raw, np.ndarray):  # load[a:b]: a text loader too
                return raw
        if self._header.text == "bytes":
            return bytes(raw)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self._files.dat}: item {i} is not UTF-8 ({e}); verify_hash tells more") from None

    __getitem__ = __call__

    def close(self) -> None:
        super().close()
        self._bytes = None


class _SetLoader(MapLoader):
    """A MapLoader for a set: ``load(i)`` is a dict of its fields' items, each field served by a
    loader of its own (``load.fields``); the attributes of a single map's layout are dicts by field."""
    __slots__ = ("_fields", "_calls")

    def _serve_fields(self, files: MapFiles, header: SetHeader, fields: dict) -> None:
        some = next(iter(fields.values()))
        self._files, self._header, self._fields = files, header, fields
        self._first, self._count = some._first, len(some)
        # (name, the field's bound __call__): load(i) then skips a lookup a field
        self._calls = tuple((name, field.__call__) for name, field in fields.items())

    def __call__(self, i, copy: bool = False) -> dict | MapLoader:
        try:
            if isinstance(i, slice):
                return self._sliced(i)
            return {name: call(i, copy) for name, call in self._calls}
        except (IndexError, TypeError, ValueError) as e:  # a field's error names the field's files
            if isinstance(e, ValueError) and not self._is_closed():
                raise  # damaged offsets or a slice's step: the file or the set named is the one to fix
            raise self._index_error(i) from None

    __getitem__ = __call__

    def _sliced(self, items: slice) -> _SetLoader:
        first, end = self._slice_range(items)
        part = _SetLoader.__new__(_SetLoader)
        part._serve_fields(self._files, self._header, {name: field[first:end] for name, field in self._fields.items()})
        return part

    def _is_closed(self) -> bool:
        return next(iter(self._fields.values()))._is_closed()

    def __getitems__(self, indices) -> list:
        columns = [field.__getitems__(indices) for field in self._fields.values()]
        return [dict(zip(self._fields, row)) for row in zip(*columns)]

    def close(self) -> None:
        for field in self._fields.values():
            field.close()

    def _by_field(self, name: str) -> dict:
        return {field_name: getattr(field, name) for field_name, field in self._fields.items()}

    fields = property(lambda self: dict(self._fields), doc=MapLoader.fields.__doc__)
    access = property(lambda self: self._by_field("access"), doc="Each field's access, by field.")
    dtype = property(lambda self: self._by_field("dtype"), doc="Each field's dtype, by field.")
    trail_dim = property(lambda self: self._by_field("trail_dim"), doc="Each field's trailing shape, by field.")
    data = property(lambda self: self._by_field("data"), doc="Each field's rows (MapLoader.data), by field.")
    starts = property(lambda self: self._by_field("starts"), doc="Each field's offsets (MapLoader.starts), by field.")
    lengths = property(lambda self: self._by_field("lengths"), doc="Each field's lengths (MapLoader.lengths), by "
                       "field: O(N) each, on first use.")

    def __getstate__(self) -> dict:
        cold = any(field.access == "cold" for field in self._fields.values())
        return {**super().__getstate__(), "access": "cold" if cold else "cached"}

    def __setstate__(self, state: dict) -> None:
        opened = _reopened(state, _open(state["path"]))
        if not isinstance(opened, OpenedSet):
            raise ValueError(f"{opened.files.json}: no longer a set of fields")
        whole = _loader(opened, state["access"])
        first, end = state["items"]
        self._serve_fields(opened.files, opened.header, whole[first:end]._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name} {field._layout()}" for name, field in self._fields.items())
        return f"<picomap.MapLoader {os.fspath(self.path)!r}: {self._count} items of fields {fields}>"


def _loader(opened: OpenedMap | OpenedSet, access: str) -> MapLoader:
    """The loader that serves an opened map or set: the class picks how items are read and returned."""
    if isinstance(opened, OpenedSet):  # its fields share the page cache: read all cold or none
        cold = _cold(sum(field.data.nbytes for field in opened.fields.values()), access)
        load = object.__new__(_SetLoader)
        load._serve_fields(opened.files, opened.header, {name: _loader(field, "cold" if cold else "cached")
                                                         for name, field in opened.fields.items()})
        return load
    cold = _cold(opened.data.nbytes, access)  # (text is always read cached: small items, copied anyway)
    load = object.__new__(_TextLoader if opened.header.text else _ColdMapLoader if cold else MapLoader)
    load._serve(opened.files, opened.header, opened.data, opened.starts, first=0)
    return load


def _reopened(state: dict, opened: OpenedMap | OpenedSet) -> OpenedMap | OpenedSet:
    """opened, if it is the map a loader was pickled from: ValueError if it was rebuilt since."""
    if opened.header.hash != state["hash"]:
        raise ValueError(f"{opened.files.json}: the map was replaced since this loader was pickled "
                         f"(hash {opened.header.hash}, expected {state['hash']})")
    return opened


def get_loader_fn(path: str | os.PathLike, *, access: str = "auto") -> tuple[MapLoader, int]:
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
    load = MapLoader(path, access=access)
    return load, len(load)


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

    ``state_dict()`` says where this rank's current pass is; ``load_state_dict`` on a sampler made
    with the same arguments makes the next ``iter()`` yield exactly what that pass had not yet
    yielded; the epoch after starts afresh. ``set_epoch(epoch, start)`` does the same from a count
    of indices you kept yourself. Cost: O(1) memory and time to the first index whatever n; P is
    computed SAMPLER_CHUNK indices at a time.
    """

    def __init__(self, n_or_sized, *, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False, block: int = 1):
        n = len(n_or_sized) if hasattr(n_or_sized, "__len__") else operator.index(n_or_sized)
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

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next passes those of ``epoch``, skipping this rank's first ``start`` indices, in O(1)."""
        epoch, start = operator.index(epoch), operator.index(start)
        if not 0 <= start <= self.share:
            raise ValueError(f"Sampler: start {start} is outside 0..{self.share}, this rank's share of an epoch")
        self.epoch, self.start, self.position = epoch, start, start

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
        """Resume from ``state_dict()``: ValueError naming the first field that differs from this sampler's."""
        mine = self.state_dict()
        for key in ("n", "seed", "block", "num_replicas", "rank", "drop_last", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"Sampler: the state was saved with {key}={state.get(key)!r}, "
                                 f"but this sampler has {key}={mine[key]!r}")
        self.set_epoch(state["epoch"], start=state["yielded"])


# ---------------------------------------------------------------- mixtures

# A mixture's length stays below this, so that every position fits an int64.
MIX_MAX_LENGTH = 1 << 62


def _weight_fraction(weight, d: int):
    """weight as an exact fraction, a float read as its shortest decimal (0.7 is 7/10, not the
    nearest binary fraction): TypeError unless it is a real number, ValueError unless finite and >= 0."""
    import numbers
    from fractions import Fraction
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
    import heapq
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


_MASK64 = (1 << 64) - 1
_SPLITMIX_INTS = tuple(int(c) for c in _SPLITMIX)


def _permute_one(x: int, size: int, keys: tuple) -> int:
    """``_permute`` of one index in Python integers, bit for bit the same, ten times faster than
    numpy on arrays of one (locate's 4 µs rather than 40)."""
    if size <= 1:
        return x
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask, (c1, c2) = (1 << half) - 1, _SPLITMIX_INTS
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            h = right ^ key
            h ^= h >> 30
            h = (h * c1) & _MASK64
            h ^= h >> 27
            h = (h * c2) & _MASK64
            left, right = right, left ^ ((h ^ (h >> 31)) & mask)
        x = (left << half) | right
        if x < size:
            return x


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
    a few µs. Nothing is tabled: memory is O(sources) whatever the length and the sources' sizes
    (4 KiB for 2, 59 KiB for 100), and construction takes 0.05 ms for 2 sources, 2.4 ms for 100
    (the default length a binary search a source). It pickles
    as its sources (loaders as their paths) and arguments, so it goes to DataLoader workers, and
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
        self._pass_keys_cache = {}  # d -> (pass, its round keys): the pass being drawn, per source

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

    def _pass_keys(self, d: int, passes: int) -> tuple:
        """Source d's round keys for that pass: (pass, as a uint64 array, as Python ints)."""
        cached = self._pass_keys_cache.get(d)
        if cached is None or cached[0] != passes:
            keys = _round_keys(self.seed, "mix", d, passes, self._sizes[d])
            cached = (passes, keys, tuple(keys.tolist()))
            self._pass_keys_cache[d] = cached
        return cached

    def locate(self, i) -> tuple[int, int]:
        """``(d, j)``: position i of the mixture is item j of source d. O(depth), integers only.

            pm.Mix([range(10), range(5)], [1, 1], shuffle=False).locate(3)   # (1, 1)
        """
        d, k = self._draw(self._index(i))
        passes, j = divmod(k, self._sizes[d])
        if self.shuffle and self._sizes[d] > 1:
            j = _permute_one(j, self._sizes[d], self._pass_keys(d, passes)[2])
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
                keys = np.stack([self._pass_keys(source, run)[1] for run in runs.tolist()], axis=1)
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
    for offsets in _checked_runs(starts, where):
        lengths = np.diff(offsets)
        low = int(lengths.min()) if low is None else min(low, int(lengths.min()))
        high, total = max(high, int(lengths.max())), total + int(offsets[-1] - offsets[0])
    return "-" if low is None else f"{low} / {total / (len(starts) - 1):.4g} / {high}"


def _info(path: str, full_meta: bool) -> None:
    with MapLoader(path) as load:
        meta = json.dumps(load.meta)
        if len(meta) > 200 and not full_meta:
            meta = f"{meta[:200]}... ({len(meta):,} characters; --full-meta shows all)"
        lines = [("path", load.path), ("items", f"{len(load):,}")]
        for name, part in (load.fields or {"": load}).items():  # a set's lines say which field
            prefix = f"{name}." if name else ""
            stats = _length_stats(part.starts, map_files(part.path).starts)
            lines += [(prefix + "dtype", part._header.text or part.dtype), (prefix + "trailing shape", part.trail_dim),
                      (prefix + "rows", f"{len(part.data):,}"), (prefix + "bytes", f"{part.data.nbytes:,}"),
                      (prefix + "item length min/mean/max", stats)]
        lines += [("hash", load.hash), ("meta", meta)]
        width = max(len(label) for label, _ in lines)
        for label, value in lines:
            print(f"{label:>{width}}: {value}")


def main(argv: list[str] | None = None) -> int:
    """The ``picomap`` command: ``demo [DIR]``, ``info PATH``, ``verify PATH``, ``merge OUT IN...``.
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
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            _demo(args.folder)
        elif args.command == "info":
            _info(args.path, args.full_meta)
        elif args.command == "merge":
            header = merge_maps(args.inputs, args.out, progress=False)
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
