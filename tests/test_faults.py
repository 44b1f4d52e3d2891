"""Faults: killed processes, stale temporaries, read-only folders, readers racing a rebuild, 64-bit sizes."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import listing, snapshot, tokens

MAP_FILES = ["toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]
PYTHONPATH = str(Path(pm.__file__).parent)


def start_python(script, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, **kwargs)


def kill_when_midway(child):
    assert child.stdout.readline() == b"midway\n"
    child.send_signal(signal.SIGKILL)
    child.wait()


# A build that says "midway" at item 500 and waits there to be killed: {item} is item i.
SLOW_BUILD_OF = """
    import time, numpy as np, picomap as pm
    pm.BATCH_BYTES = 16
    def items():
        for i in range(1000):
            if i == 500:
                print("midway", flush=True)
                time.sleep(60)
            yield {item}
    pm.build_map(items(), {path!r}, progress=False)
"""
SLOW_BUILD = SLOW_BUILD_OF.format(item="np.full(i % 9, i, np.int32)", path="toy")


def one_builds_temporaries(names):
    """True if names are the .dat and .starts.npy temporaries of one build (the json comes last)."""
    tags = {name.split(".")[-2] for name in names}
    return len(tags) == 1 and sorted(n.replace(min(tags), "T") for n in names) == [
        ".toy.dat.T.tmp", ".toy.starts.npy.T.tmp"]


def temporaries(folder):
    return [name for name in listing(folder) if name.endswith(".tmp")]


def test_a_killed_build_leaves_temporaries_that_the_next_build_removes(old_map, in_tmp):
    kill_when_midway(start_python(SLOW_BUILD, in_tmp))
    items, files = old_map
    assert snapshot("toy") == files and pm.verify_hash("toy", progress=False)
    load, n = pm.get_loader_fn("toy")
    assert n == len(items) and all(np.array_equal(load(i), item) for i, item in enumerate(items))
    left = temporaries(in_tmp)
    assert one_builds_temporaries(left)
    pm.build_map(tokens(3), "toy", progress=False)
    assert listing(in_tmp) == MAP_FILES


def test_a_live_build_keeps_its_temporaries(old_map, in_tmp):
    child = start_python(SLOW_BUILD, in_tmp)
    try:
        assert child.stdout.readline() == b"midway\n"
        live = temporaries(in_tmp)
        pm.build_map(tokens(3), "toy", progress=False)  # another build of the same map meanwhile
        assert temporaries(in_tmp) == live and one_builds_temporaries(live)
    finally:
        child.kill()
        child.wait()


def test_a_killed_merge_leaves_the_old_map(old_map, in_tmp):
    for k in range(2):
        pm.build_map(tokens(30, seed=k), f"shard{k}", progress=False)
    script = """
        import time, picomap as pm
        copy = pm._copy_into
        def stall(*args):
            copy(*args)
            print("midway", flush=True)
            time.sleep(60)
        pm._copy_into = stall  # the first shard's data is copied; killed before the rest and the commit
        pm.merge_maps(["shard0", "shard1"], "toy", progress=False)
    """
    kill_when_midway(start_python(script, in_tmp))
    assert snapshot("toy") == old_map[1] and pm.verify_hash("toy", progress=False)
    assert one_builds_temporaries(temporaries(in_tmp))
    pm.merge_maps(["shard0", "shard1"], "toy", progress=False)
    assert not temporaries(in_tmp) and pm.verify_hash("toy", progress=False)


@contextlib.contextmanager
def read_only(folder, how):
    """Make folder read-only for this process, root included, and give it back afterwards."""
    if how == "permissions":
        if os.geteuid() == 0:  # root writes through permissions: make the folder immutable instead
            if subprocess.run(["chattr", "+i", str(folder)]).returncode:
                pytest.skip("chattr +i is refused on this file system")
        else:
            folder.chmod(0o555)
        try:
            yield
        finally:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
            folder.chmod(0o755)
    else:  # a whole read-only file system
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)


@pytest.mark.parametrize("how", ["permissions", "read-only mount"])
def test_a_read_only_folder_gives_a_clear_permission_error(tmp_path, how):
    folder = tmp_path / "data"
    folder.mkdir()
    if how == "read-only mount":
        if os.geteuid() != 0:
            pytest.skip("mounting a file system needs root")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]).returncode:
            pytest.skip("this machine refuses mounts")
    try:
        pm.build_map(tokens(5), folder / "toy", progress=False)
        before, names = snapshot(folder / "toy"), listing(folder)
        with read_only(folder, how), pytest.raises(PermissionError) as caught:
            pm.build_map(tokens(3), folder / "toy", progress=False)
        assert str(caught.value).endswith(f"{folder}: cannot create files there (read-only?); nothing was changed")
        assert snapshot(folder / "toy") == before and listing(folder) == names
        assert pm.verify_hash(folder / "toy", progress=False)
    finally:
        if how == "read-only mount":
            subprocess.run(["umount", str(folder)], check=True)


def version_items(v):
    """Version v of a map whose every version differs in item count, lengths and contents."""
    return [np.full((k % 4 + v % 3 + (k == 0), 2), v * 1000 + k, np.int32) for k in range(3 + v % 5)]


def same_items(got, want) -> bool:
    """Whether loaded items are exactly want's: arrays of the same dtype, shape and values, text of
    the same type, dicts of those with the same keys in the same order."""
    if isinstance(want, dict):
        return list(got) == list(want) and all(same_items(got[k], want[k]) for k in want)
    if isinstance(want, (str, bytes)):
        return type(got) is type(want) and got == want
    return got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


REBUILD_FOREVER = """
    import sys, picomap as pm
    sys.path.insert(0, {tests!r})
    from {module} import {maker}
    for v in range(1, 100_000):
        pm.build_map({maker}(v), {path!r}, progress=False)
        if v == 1:
            print("midway", flush=True)
"""


def read_while_rebuilt(path, maker, version_of, cwd, seconds=4):
    """Load every item of the map at path again and again for `seconds` while another process
    rebuilds it from maker(1), maker(2), ...; assert each read is exactly maker(v)'s items, where v
    is version_of(the first item). Returns (reads, refusals, versions read)."""
    script = REBUILD_FOREVER.format(tests=str(Path(__file__).parent), module=maker.__module__,
                                    maker=maker.__name__, path=str(path))
    writer = start_python(script, cwd)
    assert writer.stdout.readline() == b"midway\n"
    reads, refusals, versions = 0, 0, set()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                load, n = pm.get_loader_fn(path)
                got = [load(i, copy=True) for i in range(n)]
            except (ValueError, OSError):
                refusals += 1
                continue
            v = version_of(got[0])
            want = maker(v)
            assert len(got) == len(want), f"read {len(got)} items, not the {len(want)} of version {v}"
            assert all(same_items(a, b) for a, b in zip(got, want)), f"version {v} read wrong"
            reads += 1
            versions.add(v)
    finally:
        writer.kill()
        writer.wait()
    return reads, refusals, versions


def test_readers_see_one_whole_version_while_another_process_rebuilds(in_tmp):
    pm.build_map(version_items(0), "toy", progress=False)
    first, _ = pm.get_loader_fn("toy")
    reads, refusals, versions = read_while_rebuilt("toy", version_items, lambda item: int(item[0, 0]) // 1000, in_tmp)
    assert reads > 20 and len(versions) > 5, (reads, refusals, versions)
    # with the folder lock a reader never even meets a half-committed map (without it: ~15% refused)
    assert refusals == 0 or pm.fcntl is None
    for i, item in enumerate(version_items(0)):  # opened before the rebuilds: still version 0
        assert np.array_equal(first(i), item)


def test_offsets_and_sizes_past_4_gib_are_64_bit(in_tmp):
    big = 2**32 + 10  # rows of one byte: item 0 ends past 4 GiB
    with open("toy.dat", "wb") as f:
        f.truncate(big + 5)  # sparse: almost nothing is written
        f.seek(big - 1)
        f.write(b"\x07" + bytes(range(1, 6)))
    np.save("toy.starts.npy", np.array([0, big, big + 5], np.uint64))
    Path("toy.json").write_text(json.dumps({"trail_dim": [], "hash": "0" * 32, "creation_time": "",
                                            "dtype": "uint8", "count": 2, "total_rows": big + 5}))
    load, n = pm.get_loader_fn("toy")
    assert n == 2 and load.lengths.tolist() == [big, 5]
    assert load(0).shape == (big,) and load(0)[-1] == 7 and load(0)[2**32] == 0
    assert load(1).tolist() == [1, 2, 3, 4, 5] and load(-1, copy=True).tolist() == [1, 2, 3, 4, 5]
    assert load.data.nbytes == big + 5
    with open("toy.dat", "r+b") as f:
        f.truncate(big + 4)
    with pytest.raises(ValueError, match=f"toy.dat: holds {big + 4} bytes but the json says {big + 5} rows"):
        pm.get_loader_fn("toy")


@pytest.mark.parametrize("job", ["build", "merge"])
def test_a_really_full_disk_leaves_the_old_map(tmp_path, job):
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]).returncode:
        pytest.skip("this machine refuses mounts")
    try:
        pm.build_map(tokens(20), folder / "toy", progress=False)
        before, names = snapshot(folder / "toy"), listing(folder)
        big = [np.zeros(100_000, np.int32) for _ in range(4)]  # 1.6 MB: more than the disk holds
        with pytest.raises(OSError) as caught:
            if job == "build":
                pm.build_map(big, folder / "toy", progress=False)
            else:
                pm.build_map(big, tmp_path / "shard", progress=False)
                pm.merge_maps([tmp_path / "shard"], folder / "toy", progress=False)
        assert caught.value.errno == errno.ENOSPC
        assert snapshot(folder / "toy") == before and listing(folder) == names
        assert pm.verify_hash(folder / "toy", progress=False)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.skipif(pm.fcntl is None, reason="without flock, abandoned temporaries are never removed")
@pytest.mark.parametrize("name, other", [("m[0]", "m0"), ("a*b", "aXb"), ("q?", "qq")])
def test_names_with_glob_characters_clean_up_their_own_temporaries_only(in_tmp, name, other):
    for base in (name, other):  # what a killed build of each would leave: nobody holds their flock
        for suffix in (".dat", ".starts.npy", ".digests"):
            Path(f".{base}{suffix}.0123456789ab.tmp").write_bytes(b"x")
    pm.build_map(tokens(3), name, progress=False)
    assert listing(in_tmp) == sorted([f"{name}.dat", f"{name}.digests", f"{name}.json", f"{name}.starts.npy",
                                      f".{other}.dat.0123456789ab.tmp", f".{other}.starts.npy.0123456789ab.tmp",
                                      f".{other}.digests.0123456789ab.tmp"])
