"""Maps at URLs: read over HTTP (a loopback server with Range, tests/servers.py) and S3 (moto on
loopback, through fsspec), every piece checked before it is cached or served, O(1) to open."""
import errno
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import xxhash

import picomap as pm
from conftest import LEGACY, tokens

PIECE = pm.PIECE_BYTES


def big_items(n=600, seed=0):
    """Items of 0-8,000 int32 rows: about 10 MB, so a map of many 1 MiB pieces."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-2**31, 2**31 - 1, int(k), dtype=np.int32) for k in rng.integers(0, 8000, n)]


@pytest.fixture
def served(tmp_path, range_server):
    """Build a map (or set, or text) under the served folder; returns its URL."""
    def build(items, name="toy"):
        pm.build_map(items, tmp_path / "maps" / name, progress=False)
        return f"{range_server.url}/maps/{name}"
    return build


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (str, bytes)):
        return type(a) is type(b) and a == b
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_every_item_of_a_map_a_set_and_text_equals_the_local_maps(served, tmp_path):
    items = big_items()
    cases = {"toy": items, "set": [{"x": x, "n": np.array([i]), "s": str(i)} for i, x in enumerate(items[:300])],
             "text": ["é" * i + str(i) for i in range(2000)], "raw": [bytes([i % 256]) * (i % 50) for i in range(900)]}
    for name, its in cases.items():
        url = served(its, name)
        local, n = pm.get_loader_fn(tmp_path / "maps" / name)
        load, m = pm.get_loader_fn(url, cache=tmp_path / "cache")
        assert (m, load.hash, load.path) == (n, local.hash, url)
        order = np.random.default_rng(1).permutation(n)
        assert all(same(load(int(i)), local(int(i))) for i in order), name
        assert all(same(a, b) for a, b in zip(load.__getitems__(order[:100]), local.__getitems__(order[:100])))
        assert same(load(-1), local(-1)) and same(load[5:9](2), local(7))
    load = pm.MapLoader(f"{served(items, 'toy')}.json", cache=tmp_path / "cache")  # any of its files names it
    assert np.array_equal(load.data, np.concatenate(items)) and np.array_equal(load.lengths, [len(x) for x in items])
    assert not load.data.flags.writeable and load(3).base is not None  # views of the mapped cache


def test_items_are_views_of_the_cached_file_and_a_warm_open_costs_one_request(served, tmp_path, range_server):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    opening = len(range_server.requests)
    assert opening == 3  # the json, a block of the .digests file, the offsets' piece holding both ends
    [load(i) for i in range(n)]
    fetched = range_server.requests[opening:]
    dat = [r for r in fetched if r.path.endswith(".dat")]
    assert sum(r.sent for r in dat) == os.path.getsize(tmp_path / "maps/toy.dat")  # each byte once
    range_server.reset_log()
    again, _ = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert all(np.array_equal(again(i), items[i]) for i in range(n))
    assert [r.path for r in range_server.requests] == ["/maps/toy.json"]
    cached = load._remote.files
    assert cached.dat.parent.parent == tmp_path / "cache" and cached.dat.parent.name.startswith(load.hash + "-")
    assert cached.dat.read_bytes() == (tmp_path / "maps/toy.dat").read_bytes()
    assert not again(7).flags.writeable and again(7, copy=True).flags.writeable


def test_the_cache_is_keyed_by_the_content_hash_so_a_rebuilt_map_is_never_served_from_an_old_cache(
        served, tmp_path, range_server):
    url = served(tokens(300, seed=1))
    old, _ = pm.get_loader_fn(url, cache=tmp_path / "cache")
    [old(i) for i in range(len(old))]
    new_items = tokens(300, seed=2)
    served(new_items)  # rebuilt in place on the server
    new, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert new.hash != old.hash and all(np.array_equal(new(i), new_items[i]) for i in range(n))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == sorted([old.hash, new.hash])


def test_a_map_replaced_while_a_loader_reads_it_is_an_error_never_a_mix(served, tmp_path, range_server):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert np.array_equal(load(0), items[0])
    served(big_items(seed=5))  # same sizes of file? no matter: the ETag changed
    with pytest.raises(ValueError, match=r"replaced since this map was opened|do not match|not the file"):
        [load(i) for i in range(n)]
    assert all(np.array_equal(load(i), items[i]) for i in range(n) if load._remote.dat.ready[
        load._bytes_of(i)[0] // PIECE] and load._remote.dat.ready[max(load._bytes_of(i)[1] - 1, 0) // PIECE])


def test_verify_hash_of_a_url_fetches_and_checks_every_byte(served, tmp_path, range_server):
    url = served(big_items())
    assert pm.verify_hash(url, cache=tmp_path / "cache", progress=False)
    cached = pm.MapLoader(url, cache=tmp_path / "cache")._remote.files
    for name in ("dat", "starts", "digests"):
        assert getattr(cached, name).read_bytes() == getattr(pm.map_files(tmp_path / "maps/toy"), name).read_bytes()
    set_url = served([{"a": x, "b": x[:3]} for x in big_items(50)], "set")
    assert pm.verify_hash(set_url, cache=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("where", ["dat", "starts.npy", "digests"])
def test_a_flipped_byte_on_the_server_is_never_served(served, tmp_path, range_server, where):
    items = big_items()
    url = served(items)
    size = os.path.getsize(tmp_path / f"maps/toy.{where}")
    offset = {"dat": size // 2, "starts.npy": size - 3, "digests": 5}[where]
    range_server.corrupt(f"/maps/toy.{where}", offset)
    with pytest.raises(ValueError, match=r"toy\.(dat|starts\.npy|digests): bytes \d+-\d+ do not match their "
                                         r"digest, fetched twice"):
        load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
        [load(i) for i in range(n)]
    with pytest.raises(ValueError, match="fetched twice"):
        pm.verify_hash(url, cache=tmp_path / "cache2", progress=False)
    range_server.clear_faults()  # the server mended: every item served, none wrong
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert all(np.array_equal(load(i), items[i]) for i in range(n))


def test_a_damaged_piece_names_the_map_the_bytes_and_the_items(served, tmp_path, range_server):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    first, end = load._bytes_of(400)
    range_server.corrupt("/maps/toy.dat", first)
    with pytest.raises(ValueError, match=rf"toy.dat: bytes {first // PIECE * PIECE}-\d+ do not match .*item\(s\) "
                                         r"400 not served"):
        load(400)
    assert all(r.status == 206 for r in range_server.requests[3:])


@pytest.mark.parametrize("fault", ["truncate", "drop", "503", "429", "500"])
def test_transient_faults_are_tried_again(served, tmp_path, range_server, fault):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    range_server.reset_log()
    if fault == "truncate":
        range_server.truncate("/maps/toy.dat", times=2)
    elif fault == "drop":
        range_server.drop("/maps/toy.dat", times=2, after=1000)
    else:
        range_server.fail(int(fault), times=2, path="/maps/toy.dat")
    assert all(np.array_equal(load(i), items[i]) for i in range(n))
    dat = [r for r in range_server.requests if r.path == "/maps/toy.dat"]
    assert len(dat) == 2 + len({r.range for r in dat})  # each piece fetched once, after two failures


@pytest.mark.parametrize("status, error", [(404, FileNotFoundError), (403, PermissionError)])
def test_a_missing_or_forbidden_file_is_not_tried_again(served, tmp_path, range_server, status, error):
    url = served(big_items())
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    range_server.reset_log()
    range_server.fail(status, times=10, path="/maps/toy.dat")
    with pytest.raises(error, match="toy.dat"):
        load(n // 2)
    assert len(range_server.requests) == 1
    with pytest.raises(FileNotFoundError, match="nothing.json: not found"):
        pm.get_loader_fn(url.replace("toy", "nothing"), cache=tmp_path / "cache")


def test_a_server_that_keeps_failing_raises_after_a_few_tries(served, tmp_path, range_server):
    url = served(big_items())
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    range_server.reset_log()
    range_server.fail(503, times=100, path="/maps/toy.dat")
    with pytest.raises(ConnectionError, match=r"toy.dat \(bytes \d+-\d+\): HTTP 503.*4 tries"):
        load(0)
    assert len(range_server.requests) == pm.REMOTE_TRIES


def test_a_server_that_ignores_range_or_sends_another_range_is_refused(served, tmp_path, range_server):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    range_server.ignore_range = True
    with pytest.raises(ValueError, match="ignores Range"):
        load(n - 1)
    range_server.ignore_range = False
    range_server.wrong_range("/maps/toy.dat")
    with pytest.raises(ValueError, match="asked for bytes .* the server sent 'bytes "):
        load(n - 1)
    assert np.array_equal(load(n - 1), items[n - 1])  # then it answers as it should


def test_a_piece_half_written_into_the_cache_is_fetched_again_not_served(served, tmp_path, range_server):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert all(np.array_equal(load(i), items[i]) for i in range(n))
    with open(load._remote.files.dat, "r+b") as f:  # as a process killed in the middle of a write leaves a piece
        f.seek(3 * PIECE + 100)
        f.write(b"\0" * 5000)
    range_server.reset_log()
    again, _ = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert all(np.array_equal(again(i), items[i]) for i in range(n))
    assert [r.range for r in range_server.requests if r.path.endswith(".dat")] == [
        f"bytes={3 * PIECE}-{4 * PIECE - 1}"]


def test_processes_killed_while_writing_the_cache_never_make_it_serve_wrong_bytes(served, tmp_path, range_server):
    items = big_items(300)
    url = served(items)
    range_server.delay(0.1)  # a pass takes a second or two: the kills land in the middle of it
    script = textwrap.dedent(f"""
        import numpy as np, picomap as pm, sys
        load, n = pm.get_loader_fn({url!r}, cache={str(tmp_path / 'cache')!r})
        for i in np.random.default_rng(int(sys.argv[1])).permutation(n):
            load(int(i))
    """)
    killed = 0
    for seed in range(6):
        child = subprocess.Popen([sys.executable, "-c", script, str(seed)],
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            child.wait(timeout=0.5 + 0.2 * seed)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            killed += child.wait() == -signal.SIGKILL
    range_server.delay(0)
    assert killed >= 3
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    assert all(np.array_equal(load(i), items[i]) for i in range(n))


def test_a_full_cache_folder_is_a_clear_error_and_nothing_half_written_is_served(served, tmp_path, monkeypatch):
    items = big_items()
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    real = os.pwrite

    def full(fd, data, offset):
        real(fd, bytes(data)[:len(data) // 2], offset)  # half of it goes in, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"cache/.*toy.dat: cannot write fetched bytes .* \(No space left on device\); "
                                      r"free space there or pass cache="):
        load(n // 2)
    monkeypatch.setattr(os, "pwrite", real)
    assert all(np.array_equal(load(i), items[i]) for i in range(n))


def test_maps_written_before_the_digests_file_are_refused_with_what_to_do(tmp_path, range_server):
    shutil.copytree(LEGACY, tmp_path / "legacy")
    with pytest.raises(ValueError, match=r"written before picomap 1.4.*picomap merge OLD NEW"):
        pm.get_loader_fn(f"{range_server.url}/legacy/ragged_f32", cache=tmp_path / "cache")
    pm.merge_maps([tmp_path / "legacy/ragged_f32"], tmp_path / "legacy/new", progress=False)
    load, n = pm.get_loader_fn(f"{range_server.url}/legacy/new", cache=tmp_path / "cache")
    local, _ = pm.get_loader_fn(tmp_path / "legacy/ragged_f32")
    assert all(np.array_equal(load(i), local(i)) for i in range(n))


def test_opening_costs_the_same_requests_and_memory_whatever_the_count(tmp_path, range_server):
    costs = []
    for count in (1000, 1_000_000):
        pm.build_map((np.zeros(0, np.uint8) for _ in range(count)), tmp_path / f"m{count}", progress=False)
        range_server.reset_log()
        tracemalloc.start()
        load, n = pm.get_loader_fn(f"{range_server.url}/m{count}", cache=tmp_path / "cache")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert n == count
        costs.append((len(range_server.requests), sum(r.sent for r in range_server.requests), peak))
    assert costs[0][0] == costs[1][0] == 3
    assert costs[1][1] < costs[0][1] + 2 * PIECE  # two pieces of offsets at most, whatever the count
    assert costs[1][2] < 4 << 20


def test_a_pickled_loader_carries_its_url_and_cache(served, tmp_path):
    items = big_items()
    url = served(items)
    load, _ = pm.get_loader_fn(url, cache=tmp_path / "cache")
    part = pickle.loads(pickle.dumps(load[100:200]))
    assert (part.path, len(part), part._url) == (url, 100, (url, os.fspath(tmp_path / "cache"), None))
    assert all(np.array_equal(part(i), items[100 + i]) for i in range(100))
    cold = pm.MapLoader(url, cache=tmp_path / "cache", access="cold")  # its cache read as a cold map's
    assert (load.access, cold.access, pickle.loads(pickle.dumps(cold)).access) == ("cached", "cold", "cold")
    assert np.array_equal(cold(5), items[5]) and np.array_equal(pm.Windows(cold, 64)(3), load.data[192:257])


def read_all(load, indices, queue):
    queue.put([load(int(i)).sum() for i in indices])


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_processes_started_every_way_read_a_remote_map(served, tmp_path, method):
    items = big_items(300)
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    load(0)  # the parent's client and pool exist: a forked child must make its own
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    children = [context.Process(target=read_all, args=(load, range(k, n, 2), queue)) for k in range(2)]
    for child in children:
        child.start()
    sums = sorted(sum(queue.get(timeout=60)) for _ in children)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sums == sorted(sum(int(items[i].sum()) for i in range(k, n, 2)) for k in range(2))


def as_list(batch):
    return batch


@pytest.mark.parametrize("cache_bytes", [None, 3 * PIECE])
def test_a_dataloader_with_workers_and_a_block_sampler_reads_every_item_once(served, tmp_path, cache_bytes):
    torch = pytest.importorskip("torch")
    items = big_items(400)
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache", cache_bytes=cache_bytes)
    for method in ("fork", "spawn") if cache_bytes is None else ("fork",):
        sampler = pm.Sampler(n, seed=3, block=16)
        loader = torch.utils.data.DataLoader(load, sampler=sampler, batch_size=8, num_workers=2,
                                             collate_fn=as_list, multiprocessing_context=method)
        seen = sorted((int(x[0]) if len(x) else 0, len(x)) for batch in loader for x in batch)
        assert seen == sorted((int(x[0]) if len(x) else 0, len(x)) for x in items)


def test_a_capped_cache_serves_copies_stays_under_its_cap_and_never_serves_an_evicted_piece(served, tmp_path):
    items = big_items(800)  # about 12 MiB
    url = served(items)
    cap = 4 * PIECE
    whole, n = pm.get_loader_fn(url, cache=tmp_path / "cache")  # uncapped, beside: its views never change
    views = [whole(i) for i in range(n)]
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache", cache_bytes=cap)
    dat = load._remote.files.dat
    assert dat.parent.name == "capped" and dat.parent.parent == whole._remote.files.dat.parent
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=read_all, args=(load, np.random.default_rng(k).permutation(n), queue))
                for k in range(2)]
    for child in children:
        child.start()
    mine = [np.array_equal(x, items[i]) and x.flags.writeable for i, x in enumerate(load.__getitems__(range(n)))]
    sums = [sum(queue.get(timeout=120)) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert all(mine) and sums == [sum(int(x.sum()) for x in items)] * 2
    assert all(np.array_equal(view, x) for view, x in zip(views, items))
    assert os.stat(dat).st_blocks * 512 <= cap  # each process evicts its own pieces down to the cap
    with pytest.raises(ValueError, match="load.data would need every piece"):
        load.data
    assert not np.shares_memory(load(3), load(3))  # copies, never views of pieces that may be evicted


def test_windows_over_a_remote_map_equal_the_local_ones(served, tmp_path):
    docs = [np.arange(k, dtype=np.uint16) for k in np.random.default_rng(0).integers(1, 900, 3000)]
    url = served(docs)
    remote = pm.Windows(pm.MapLoader(url, cache=tmp_path / "cache"), 512)
    local = pm.Windows(pm.MapLoader(tmp_path / "maps/toy"), 512)
    assert len(remote) == len(local)
    for k in np.random.default_rng(1).permutation(len(local))[:300]:
        assert np.array_equal(remote(int(k)), local(int(k)))
        assert np.array_equal(remote.cu_seqlens(int(k)), local.cu_seqlens(int(k)))


def test_a_map_set_and_text_on_s3_read_through_fsspec(tmp_path, s3_server):
    pytest.importorskip("s3fs")
    items = big_items(200)
    cases = {"toy": items, "set": [{"a": x, "t": str(i)} for i, x in enumerate(items)], "text": ["ab" * i for i in range(500)]}
    s3_server.make_bucket("data")
    for name, its in cases.items():
        pm.build_map(its, tmp_path / name, progress=False)
        for path in sorted((tmp_path).glob(f"{name}.*"), key=lambda p: p.suffix == ".json") + sorted(
                tmp_path.glob(f"{name}.fields/*/*")):
            if path.is_file():
                s3_server.upload(path, f"s3://data/ds/{path.relative_to(tmp_path)}")
        load, n = pm.get_loader_fn(f"s3://data/ds/{name}", cache=tmp_path / "cache")
        local, _ = pm.get_loader_fn(tmp_path / name)
        assert n == len(its) and all(same(load(i), local(i)) for i in range(n))
        assert pm.verify_hash(f"s3://data/ds/{name}", cache=tmp_path / "cache2", progress=False)
    # a flipped byte in the object store is never served
    damaged = bytearray((tmp_path / "toy.dat").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    s3_server.replace(bytes(damaged), "s3://data/ds/toy.dat")
    with pytest.raises(ValueError, match="do not match their digest"):
        pm.verify_hash("s3://data/ds/toy", cache=tmp_path / "cache3", progress=False)


def test_building_at_a_url_says_that_picomap_writes_local_maps_only():
    with pytest.raises(ValueError, match="is a URL; picomap reads maps at URLs"):
        pm.build_map([np.zeros(3)], "s3://bucket/toy", progress=False)
    with pytest.raises(ValueError, match="is a URL"):
        pm.merge_maps(["http://127.0.0.1:1/a"], "out", progress=False)


def test_a_pass_resumed_in_a_new_process_reads_the_same_items(served, tmp_path):
    items = big_items(300)
    url = served(items)
    load, n = pm.get_loader_fn(url, cache=tmp_path / "cache")
    sampler = pm.Sampler(load, seed=7, block=8)
    order = list(sampler)
    taken = iter(sampler)
    first = [next(taken) for _ in range(100)]
    state = pickle.dumps((load, sampler.state_dict()))
    again, state_dict = pickle.loads(state)  # as a restarted job finds them in its checkpoint
    resumed = pm.Sampler(again, seed=7, block=8)
    resumed.load_state_dict(state_dict)
    rest = list(resumed)
    assert first + rest == order
    assert all(np.array_equal(again(i), items[i]) for i in rest)


def test_a_mixture_of_a_remote_and_a_local_map(served, tmp_path):
    items = big_items(200)
    url = served(items)
    remote = pm.MapLoader(url, cache=tmp_path / "cache")
    local = pm.MapLoader(tmp_path / "maps/toy")
    mix = pm.Mix([remote, local], [1, 3], seed=1)
    for i, x in zip(range(len(mix)), mix.__getitems__(range(len(mix)))):
        d, j = mix.locate(i)
        assert np.array_equal(x, items[j])


def test_the_command_line_describes_and_verifies_a_url(served, tmp_path, monkeypatch, capsys):
    url = served(big_items(100))
    monkeypatch.setenv("PICOMAP_CACHE", str(tmp_path / "default-cache"))
    assert pm.main(["info", url]) == 0 and pm.main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert f"path: {url}" in out and "items: 100" in out and f"ok: {url} is intact" in out
    assert pm.MapLoader(url)._remote.files.dat.parent.parent == tmp_path / "default-cache"


def test_the_benchmark_runs_quick_and_finds_nothing_wrong(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "remote.py")
    result = subprocess.run([sys.executable, script, "--quick", "--folder", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert "picomap remote, cold cache" in result.stdout and result.stdout.rstrip().endswith("nothing looked wrong")
