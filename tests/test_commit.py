"""The commit protocol: a failure or a SIGKILL at every step of a commit, builds racing on one path,
threads appending to one writer, and the folders a failed build made."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import picomap as pm
from conftest import listing, tokens
from test_faults import same_items, version_items

PYTHONPATH = str(Path(pm.__file__).parent)
STEPS = ("link", "replace", "fsync", "unlink")  # the system calls of a commit a fault is injected into


def clips(n, seed):
    rng = np.random.default_rng(seed)
    return [{"audio": rng.standard_normal(int(rng.integers(1, 9))).astype(np.float32),
             "text": f"clip {seed}.{k}"} for k in range(n)]


KINDS = {"map": lambda seed: tokens(12, seed=seed), "set": lambda seed: clips(5, seed)}


def read_all(path):
    load, n = pm.get_loader_fn(path)
    return [load(i, copy=True) for i in range(n)]


def is_whole(got, want) -> bool:
    return len(got) == len(want) and all(same_items(a, b) for a, b in zip(got, want))


def commit_calls(kind, folder) -> list:
    """The links, renames, fsyncs and unlinks a clean commit of this kind makes, in order."""
    pm.build_map(KINDS[kind](1), folder / "probe", progress=False)
    calls = []
    with inject(lambda name: calls.append(name)):
        pm.build_map(KINDS[kind](2), folder / "probe", progress=False)
    return calls


def committed_after(calls) -> int:
    """The step after which a commit is done: the folder's fsync after the last rename."""
    last_rename = max(k for k, name in enumerate(calls) if name == "replace")
    return calls.index("fsync", last_rename)


class inject:
    """While a commit runs, call on_call(name) before each os.link, os.replace and os.fsync."""

    def __init__(self, on_call):
        self.on_call, self.real = on_call, {name: getattr(os, name) for name in STEPS}
        self.commit = pm._Staging.commit

    def __enter__(self):
        on_call, real, commit = self.on_call, self.real, self.commit
        active = []

        def wrapped(name):
            def call(*args, **kwargs):
                if active:
                    on_call(name)
                return real[name](*args, **kwargs)
            return call

        def committing(staging):
            active.append(True)
            try:
                return commit(staging)
            finally:
                active.clear()
        for name in STEPS:
            setattr(os, name, wrapped(name))
        pm._Staging.commit = committing
        return self

    def __exit__(self, *exc):
        for name, function in self.real.items():
            setattr(os, name, function)
        pm._Staging.commit = self.commit


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", KINDS)
def test_a_failure_at_any_step_of_a_commit_leaves_the_old_map_or_the_new_one(in_tmp, kind, error):
    calls_of_a_commit = commit_calls(kind, in_tmp)
    steps, point = len(calls_of_a_commit), committed_after(calls_of_a_commit)
    assert calls_of_a_commit.count("replace") == (4 if kind == "map" else 1) and steps > point + 1
    old, new = KINDS[kind](3), KINDS[kind](4)
    for k in range(steps):
        pm.build_map(old, "toy", progress=False)
        calls = []

        def fail_at_k(name):
            calls.append(name)
            if len(calls) == k + 1:
                raise error(5, f"injected failure at {name} #{k}") if error is OSError else error()
        with inject(fail_at_k):
            try:
                pm.build_map(new, "toy", progress=False)
                raised = False
            except error:
                raised = True
        got = read_all("toy")
        assert is_whole(got, new if k > point else old), f"{error.__name__} at step {k} ({calls[-1]}): not whole"
        assert raised == (k <= point or error is KeyboardInterrupt)  # an OSError once committed is not the build's
        assert pm.verify_hash("toy", progress=False)
        pm.build_map(old, "toy", progress=False)  # the next build removes whatever a failed clean-up left
        assert not [name for name in listing(in_tmp) if name.startswith(".toy")], (k, listing(in_tmp))


KILL_AT_STEP = """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import picomap as pm
    from test_commit import KINDS, inject
    calls = []
    def kill_at_k(name):
        calls.append(name)
        if len(calls) == {k} + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    with inject(kill_at_k):
        pm.build_map(KINDS[{kind!r}](4), "toy", progress=False)
"""


@pytest.mark.parametrize("kind", KINDS)
def test_a_sigkill_at_any_step_of_a_commit_leaves_the_old_map_or_the_new_one(in_tmp, kind):
    steps = len(commit_calls(kind, in_tmp))
    old, new = KINDS[kind](3), KINDS[kind](4)
    outcomes = []
    for k in range(steps):
        pm.build_map(old, "toy", progress=False)
        script = textwrap.dedent(KILL_AT_STEP.format(tests=str(Path(__file__).parent), k=k, kind=kind))
        child = subprocess.run([sys.executable, "-c", script], cwd=in_tmp, env={**os.environ, "PYTHONPATH": PYTHONPATH})
        assert child.returncode == -signal.SIGKILL
        got = read_all("toy")  # the next open finishes the commit, forward or back
        assert is_whole(got, old) or is_whole(got, new), f"a SIGKILL at step {k} left a mixed map"
        outcomes.append("new" if is_whole(got, new) else "old")
        assert pm.verify_hash("toy", progress=False)
        pm.build_map(old, "toy", progress=False)  # and the next build removes what the dead one left
        assert not [name for name in listing(in_tmp) if name.startswith(".toy")], (k, listing(in_tmp))
    assert outcomes[0] == "old" and outcomes[-1] == "new"  # killed before its intent, and after its renames


REBUILD_LOOP = """
    import sys, time, picomap as pm
    sys.path.insert(0, {tests!r})
    from test_faults import version_items
    failures, builds, deadline = 0, 0, time.monotonic() + {seconds}
    v = {first}
    while time.monotonic() < deadline:
        try:
            if v % 4 == 3:  # a merge into the path now and then, of shards of this process's own
                half = len(version_items(v)) // 2
                pm.build_map(version_items(v)[:half], "shard-{first}-a", progress=False)
                pm.build_map(version_items(v)[half:], "shard-{first}-b", progress=False)
                pm.merge_maps(["shard-{first}-a", "shard-{first}-b"], "toy", progress=False)
            else:
                pm.build_map(version_items(v), "toy", progress=False)
            builds += 1
        except Exception as e:
            failures += 1
            print(type(e).__name__, e, file=sys.stderr, flush=True)
        v += 3
    print(builds, failures, flush=True)
"""


def test_processes_building_and_reading_one_path_at_once_never_fail_nor_mix(in_tmp):
    pm.build_map(version_items(0), "toy", progress=False)
    script = REBUILD_LOOP.format(tests=str(Path(__file__).parent), seconds=4, first="{first}")
    builders = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script.replace("{first}", str(first)))],
                                 cwd=in_tmp, env={**os.environ, "PYTHONPATH": PYTHONPATH}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for first in (1, 2, 3)]
    reads, versions = 0, set()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        got = read_all("toy")
        v = int(got[0][0, 0]) // 1000
        assert is_whole(got, version_items(v)), f"read a mix of versions around {v}"
        reads, versions = reads + 1, versions | {v}
    results = [child.communicate(timeout=60) for child in builders]
    for out, err in results:
        builds, failures = map(int, out.split())
        assert failures == 0 and builds > 3, err
    assert reads > 20 and len(versions) > 5
    assert pm.verify_hash("toy", progress=False)
    assert [name for name in listing(in_tmp) if name.startswith(("toy", ".toy"))] == [
        "toy.dat", "toy.digests", "toy.json", "toy.starts.npy"]


def test_threads_appending_to_one_writer_store_every_item_once(in_tmp):
    items = [np.full(k % 5 + 1, k, np.int64) for k in range(4000)]
    with pm.MapWriter("toy", progress=False) as writer:
        def append(part):
            for item in part:
                writer.append(item)
        threads = [threading.Thread(target=append, args=(items[t::4],)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(writer) == len(items)
    got = read_all("toy")
    assert sorted(int(item[0]) for item in got) == list(range(4000))
    assert all(np.array_equal(item, items[int(item[0])]) for item in got)
    assert pm.verify_hash("toy", progress=False)


@pytest.mark.parametrize("items, where", [([np.array(1)], "new/a/x"), ([{"bad name/": np.zeros(2)}], "new3/x"),
                                          (iter([np.zeros(2), "text"]), "deep/er/x")])
def test_a_failed_build_leaves_no_folder_it_made(in_tmp, items, where):
    Path("kept").mkdir()  # a folder that was there before stays
    with pytest.raises(ValueError):
        pm.build_map(items, where, progress=False)
    assert listing(in_tmp) == ["kept/"]


def test_a_merge_refused_leaves_no_folder_it_made(in_tmp):
    pm.build_map(tokens(3), "a", progress=False)
    pm.build_map(["text"], "b", progress=False)
    with pytest.raises(ValueError, match="shard 1"):
        pm.merge_maps(["a", "b"], "out/merged", progress=False)
    assert not Path("out").exists()


def test_a_build_never_removes_a_folder_of_its_fields_folder_that_is_not_a_build(in_tmp):
    pm.build_map(clips(3, 0), "ds", progress=False)
    mine = Path("ds.fields") / ("0" * 12)  # named like a build, but holding the user's own file
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    pm.build_map(clips(3, 1), "ds", progress=False)
    pm.build_map(tokens(3), "ds", progress=False)  # a plain map replacing the set
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["file", "grandparent"])
def test_a_file_where_the_folder_should_be_is_a_clear_error(in_tmp, where):
    Path("f").write_text("")
    path = "f/x" if where == "file" else "f/sub/x"
    with pytest.raises(ValueError, match="f: not a folder, where the map's folder f.* should be"):
        pm.build_map(tokens(2), path, progress=False)
    assert listing(in_tmp) == ["f"]


def as_written_before_1_4(base):
    """Make the map at base one picomap 1.3 wrote: no .digests file, no digests of the offsets in its json."""
    Path(f"{base}.digests").unlink()
    header = json.loads(Path(f"{base}.json").read_text())
    del header["starts_block_bytes"], header["starts_block_digests"]
    Path(f"{base}.json").write_text(json.dumps(header))


# A map's commit renames its files in the order of its intent's "files", the json last; picomap 1.3's
# intents name three files (no .digests), and are still finished.
INTENT_PARTS = {"1.4": ([0, 1, 3, 2], [".dat", ".starts.npy", ".digests", ".json"]),
                "1.3": ([0, 1, 2], [".dat", ".starts.npy", ".json"])}


@pytest.mark.parametrize("written_by", INTENT_PARTS)
def test_a_commit_left_unfinished_is_finished_by_the_next_reader(in_tmp, written_by):
    """What a power cut between two renames leaves: the intent, one file renamed, the others to go."""
    parts, suffixes = INTENT_PARTS[written_by]
    pm.build_map(tokens(5, seed=1), "toy", progress=False)
    new = tokens(7, seed=2)
    pm.build_map(new, "next", progress=False)
    if written_by == "1.3":
        as_written_before_1_4("toy")
        as_written_before_1_4("next")
    tag = "0123456789ab"
    for suffix in suffixes:  # backups of the old map's files
        os.link(f"toy{suffix}", f".toy{suffix}.{tag}.old")
    inodes = [[os.stat(f"next{suffix}").st_dev, os.stat(f"next{suffix}").st_ino] for suffix in suffixes]
    os.replace("next.dat", "toy.dat")  # the first rename happened
    for suffix in suffixes[1:]:
        os.replace(f"next{suffix}", f".toy{suffix}.{tag}.tmp")
    Path(".toy.json.commit").write_text(json.dumps({"build": tag, "files": parts, "had": parts,
                                                    "inodes": inodes}))
    assert is_whole(read_all("toy"), new)
    assert listing(in_tmp) == sorted(f"toy{suffix}" for suffix in suffixes)
    assert pm.verify_hash("toy", progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_files_that_may_not_be_hard_linked_are_backed_up_by_a_rename(in_tmp, monkeypatch, kind):
    """Another user's file under Linux's protected_hardlinks, or FAT: os.link refuses (EPERM)."""
    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")
    old, new = KINDS[kind](3), KINDS[kind](4)
    monkeypatch.setattr(pm.os, "link", refused)
    pm.build_map(old, "toy", progress=False)
    pm.build_map(new, "toy", progress=False)  # the rebuild works
    assert is_whole(read_all("toy"), new)
    renames = 0
    while True:  # and a failure at each rename of a commit still leaves the old map or the new one
        pm.build_map(old, "toy", progress=False)
        calls = []

        def fail_at_rename(name, k=renames):
            if name == "replace":
                calls.append(name)
                if len(calls) == k + 1:
                    raise OSError(5, "injected")
        with inject(fail_at_rename):
            try:
                pm.build_map(new, "toy", progress=False)
                raised = False
            except OSError:
                raised = True
        assert is_whole(read_all("toy"), old if raised else new) and pm.verify_hash("toy", progress=False)
        if not raised:
            break
        renames += 1
    assert renames == (8 if kind == "map" else 2)  # each file renamed to its backup, then replaced


GO_BACK_THEN_DIE = """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import picomap as pm
    from test_commit import KINDS, inject
    calls = []
    def fail_then_die(name):
        calls.append(name)
        if name == "replace" and calls.count("replace") == {failing_rename}:
            raise OSError(5, "injected")  # the commit goes back ...
        if name == "unlink" and calls.count("replace") >= {failing_rename}:
            os.kill(os.getpid(), signal.SIGKILL)  # ... and dies before it forgets its intent
    with inject(fail_then_die):
        pm.build_map(KINDS["map"](4), "toy", progress=False)
"""


@pytest.mark.parametrize("failing_rename", [2, 3, 4])  # each rename after the first: the json's is the 4th
def test_a_commit_that_went_back_and_died_is_not_undone_twice(in_tmp, failing_rename):
    """The next open finds the intent of a commit already put back: going back again keeps the old map."""
    old = KINDS["map"](3)
    pm.build_map(old, "toy", progress=False)
    script = textwrap.dedent(GO_BACK_THEN_DIE.format(tests=str(Path(__file__).parent), failing_rename=failing_rename))
    child = subprocess.run([sys.executable, "-c", script], cwd=in_tmp, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert child.returncode == -signal.SIGKILL and Path(".toy.json.commit").exists()
    assert is_whole(read_all("toy"), old) and pm.verify_hash("toy", progress=False)
    assert is_whole(read_all("toy"), old)  # and again: nothing more is undone
    pm.build_map(old, "toy", progress=False)
    assert not [name for name in listing(in_tmp) if name.startswith(".toy")]


def test_a_reader_waiting_for_the_lock_while_a_build_dies_mid_commit_reads_one_map(in_tmp, monkeypatch):
    """A reader past its first look for an intent, then a build killed after its first rename: the
    reader's look under the lock finds the intent, and it reads one whole map."""
    old, new = KINDS["map"](3), KINDS["map"](4)
    pm.build_map(old, "toy", progress=False)
    after_first_rename = commit_calls("map", in_tmp).index("replace") + 1
    script = textwrap.dedent(KILL_AT_STEP.format(tests=str(Path(__file__).parent), k=after_first_rename, kind="map"))
    real_lock, ran = pm._folder_lock, []

    @contextlib.contextmanager
    def build_dies_first(folder, exclusive):
        if not exclusive and not ran:
            ran.append(subprocess.run([sys.executable, "-c", script], cwd=in_tmp,
                                      env={**os.environ, "PYTHONPATH": PYTHONPATH}).returncode)
        with real_lock(folder, exclusive) as fd:
            yield fd
    monkeypatch.setattr(pm, "_folder_lock", build_dies_first)
    got = read_all("toy")
    assert ran == [-signal.SIGKILL] and (is_whole(got, old) or is_whole(got, new))


def test_a_build_keeps_the_files_of_a_build_whose_claim_it_cannot_open(in_tmp, monkeypatch):
    """Another user's live build, whose temporaries this process may not read: they are kept."""
    pm.build_map(tokens(3), "toy", progress=False)
    tag = "0123456789ab"
    others = [Path(f".toy{suffix}.{tag}.tmp") for suffix in (".dat", ".starts.npy")]
    for path in others:
        path.write_bytes(b"x")
    real_open = os.open

    def unreadable(path, *args, **kwargs):
        if Path(path).name.startswith(".toy") and tag in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(pm.os, "open", unreadable)
    pm.build_map(tokens(4), "toy", progress=False)
    assert all(path.exists() for path in others)


def test_a_commit_killed_midway_is_one_that_picomap_1_3_finishes_too(in_tmp):
    """The intent's top level is the commit of the three files 1.3 knows, which 1.3 finishes (its
    record would otherwise look cut short, and be dropped with half the files renamed); this
    picomap reads the whole record, "all"."""
    old, new = tokens(5, seed=1), tokens(9, seed=2)
    pm.build_map(old, "toy", progress=False)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(pm.__file__).parent)!r})
        import numpy as np, picomap as pm
        real = os.replace
        def replace(a, b, *rest, **kw):
            real(a, b, *rest, **kw)
            if str(b) == "toy.starts.npy":
                os.kill(os.getpid(), signal.SIGKILL)  # the .dat and offsets renamed, the digests and json not
        pm.os.replace = replace
        pm.build_map({[x.tolist() for x in new]!r}, "toy", progress=False, dtype=np.int32)
    """)
    assert subprocess.run([sys.executable, "-c", script], cwd=in_tmp).returncode == -signal.SIGKILL
    shown = json.loads(Path(".toy.json.commit").read_text())
    assert shown["files"] == [0, 1, 2] and len(shown["inodes"]) == 3 and shown["all"]["files"] == [0, 1, 3, 2]
    assert set(shown["had"]) <= {0, 1, 2} and shown["all"]["had"] == [0, 1, 3, 2]
    # as picomap 1.3 reads it: the three files' commit alone, finished forward
    Path(".toy.json.commit").write_text(json.dumps({k: v for k, v in shown.items() if k != "all"}))
    assert is_whole(read_all("toy"), new)
    with pytest.raises(ValueError, match=r"toy.digests: does not hold the digests"):  # the old map's, left
        pm.verify_hash("toy", progress=False)
