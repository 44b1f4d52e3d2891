"""Shared helpers: an independent hash oracle, item makers, and where the 0.1 fixtures live (in the repository)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy-0.1"  # copies of ../shared/fixtures
LEGACY_NAMES = ["ragged_f32", "tokens_u16", "flags_bool"]


def oracle_tag(dtype) -> bytes:
    """A frame's dtype tag from the spec: v1 where dtype.str names the dtype, else v2 with its json text."""
    try:
        named_by_str = np.dtype(dtype.str) == dtype
    except TypeError:  # float8_e5m2's "<f1"
        named_by_str = False
    if named_by_str:
        return b"A|v1|" + dtype.str.encode("ascii")
    text = json.dumps(dtype.descr if dtype.names is not None else str(dtype)).encode()
    return b"A|v2|" + len(text).to_bytes(8, "little") + text


def oracle_hash(items) -> str:
    """The content hash written straight from the spec, sharing no code with picomap. Text items
    (str, bytes) are uint8 items of their UTF-8 bytes, and the stream ends saying which text."""
    h = xxhash.xxh3_128()
    h.update(b"D|v1|")
    text = None
    for item in items:
        if isinstance(item, (str, bytes)):
            text = type(item).__name__
            item = np.frombuffer(item.encode("utf-8") if isinstance(item, str) else item, np.uint8)
        a = np.asarray(item)
        h.update(oracle_tag(a.dtype))
        h.update(np.array([a.ndim, *a.shape], dtype="<i8").tobytes())
        h.update(a.tobytes(order="C"))
    h.update(b"D|end|" if text is None else f"D|{text}|end|".encode())
    return h.hexdigest()


def oracle_set_hash(items) -> str:
    """A set's hash from the spec: its fields' names and hashes in name order, framed."""
    h = xxhash.xxh3_128()
    h.update(b"S|v1|")
    for name in sorted(items[0]):
        h.update(len(name.encode()).to_bytes(8, "little") + name.encode())
        h.update(bytes.fromhex(oracle_hash([item[name] for item in items])))
    h.update(b"S|end|")
    return h.hexdigest()


def tokens(n_items=50, seed=0, dtype=np.int32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, int(n)).astype(dtype) for n in rng.integers(0, 30, n_items)]


def traced_peak(work) -> int:
    """The peak of Python's and numpy's allocations while work() runs (tracemalloc)."""
    import tracemalloc
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def anonymous_bytes() -> int:
    """This process's anonymous memory (Linux): what it holds privately, file-backed pages apart."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line in /proc/self/smaps_rollup")


def listing(folder) -> list[str]:
    """Every file under folder, and every empty folder (with a trailing /), relative, sorted: what
    a test asserts is left on disk."""
    return sorted(str(p.relative_to(folder)) + ("" if p.is_file() else "/") for p in Path(folder).rglob("*")
                  if p.is_file() or p.is_dir() and not any(p.iterdir()))


def snapshot(base) -> dict:
    """The bytes of a map's files (those it has: maps of picomap before 1.4 have no .digests), to
    assert they did not change."""
    return {suffix: Path(f"{base}{suffix}").read_bytes() for suffix in (".dat", ".starts.npy", ".json", ".digests")
            if Path(f"{base}{suffix}").exists()}


def read_json(base) -> dict:
    return json.loads(Path(f"{base}.json").read_text())


def write_json(base, header) -> None:
    Path(f"{base}.json").write_text(json.dumps(header))


@pytest.fixture
def old_map(in_tmp):
    """A map at ./toy before the test tries to replace it: its items and its files' bytes."""
    import picomap as pm
    items = tokens(20, seed=1)
    pm.build_map(items, "toy", progress=False)
    return items, snapshot("toy")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside a fresh folder, as a user running a script there would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_report_header(config):
    return f"legacy 0.1 fixtures: {LEGACY}; cpus: {os.cpu_count()}"


@pytest.fixture
def range_server(tmp_path):
    """A RangeServer (tests/servers.py) serving tmp_path: what a test writes there is at
    f"{range_server.url}/NAME"."""
    from servers import RangeServer
    with RangeServer(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def _s3_session():
    """One moto server for the whole run (starting and stopping one costs about a second)."""
    from servers import S3Server
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(_s3_session, monkeypatch):
    """An S3Server with no buckets, and this test's environment sending s3fs (and boto3) to it,
    also in the children it starts; the environment is restored after the test."""
    for name, value in _s3_session.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    _s3_session.reset()
    yield _s3_session
    _s3_session.reset()
