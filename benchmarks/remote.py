"""Remote maps over HTTP: picomap's 1 MiB pieces against the access patterns of its peers.

    python benchmarks/remote.py [--quick] [--latency 0.02] [--items 200000] [--item-kib 8] [--block-mib 4]
                                [--sizes 1e6,1e8] [--maps DIR] [--parts traffic,open,speed] [--rounds 3]

Every figure comes from one loopback ``RangeServer`` (tests/servers.py) that waits ``--latency`` seconds
before the first byte of each response, as an object store far away would.

traffic: a map of ``--items`` items of 4..12 KiB (mean ``--item-kib``) is built once; then, for a full
    shuffled pass (``Sampler(n, seed=0)``) and a block-shuffled pass (``block=B``, B items making
    ``--block-mib`` MiB), in batches of 32 through ``load.__getitems__``:
    - picomap: a remote loader on an empty cache (cold) then the same pass again (warm). Its requests
      and the bytes they carried are counted from the server's log, never estimated; the log is
      also checked for bytes fetched twice and for requests beyond the pieces the pass needed.
    - its peers, simulated on the same map's offsets for the same item order: the exact list of
      ranged requests each would issue is computed from its rules (below), then replayed for real
      against the same server when cheap (all of it, or a prefix with the time extrapolated
      linearly; the table says which), one request at a time as each peer's reader does:
        Megatron-LM's S3 reader (megatron/core/datasets/indexed_dataset.py, ``_S3BinReader``, its
        ``bin_chunk_nbytes`` 256 MiB by default): one block in memory per reader; a read outside it
        fetches the 256 MiB-aligned block holding its start (extended to the read's end).
        One ranged request per item: OLMo-core (olmo_core/io.py ``get_bytes_range`` for each
        instance) and Megatron's ``_MultiStorageClientBinReader``.
        Whole shards of 64 MiB (items packed whole, as MosaicML streaming's MDSWriter ``size_limit``
        and LitData's chunks), downloaded on first touch and kept: with no cache limit, and with a
        limit of ``--shard-cap`` shards evicted least recently used.
    - the baseline for speed: the same pass over the same map opened from its local path.
open: maps of 10^6 and 10^8 (``--sizes``) one-byte items (8 bytes of offsets each: 800 MB at 10^8),
    opened remotely in fresh processes: requests and bytes at open, time to open with an empty
    cache and with a warm one, tracemalloc's peak and the growth of RSS and of anonymous memory
    while opening, and the time and requests for a first item.
speed: with the traffic map's cache full, ``load(i)`` and ``__getitems__`` of the remote loader
    against the local loader of the same map, random items, rounds interleaved.
"""
import argparse
import collections
import gc
import inspect
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import picomap as pm  # noqa: E402

BATCH = 32
PIECE = 1 << 20
MiB, GiB = 1 << 20, 1 << 30


# ---------------------------------------------------------------- maps

def items_map(folder: Path, n: int, mean_kib: float) -> Path:
    """A map of n uint8 items of 0.5..1.5x mean_kib KiB, built with build_map (or reused from folder)."""
    mean = int(mean_kib * 1024)
    base = folder / f"items-{n}-{mean}"
    if not Path(f"{base}.json").exists():
        rng = np.random.default_rng(0)
        lengths = rng.integers(mean // 2, mean + mean // 2 + 1, n)
        pool = rng.integers(0, 256, 1 << 24, dtype=np.uint8)  # items are windows of it, each at its own place
        where = rng.integers(0, len(pool) - lengths.max(), n)
        pm.build_map((pool[w:w + k] for w, k in zip(where.tolist(), lengths.tolist())), base, progress=False)
    return base


def byte_map(folder: Path, n: int) -> Path:
    """A map of n items of one byte: 8 bytes of offsets and 1 of data each (or reused from folder). Not
    empty items: their offsets would all be 0, and a piece of zeros is whole in a sparse cache unfetched."""
    base = folder / f"byte-{n}"
    if not Path(f"{base}.json").exists():
        pm.build_map(itertools.repeat(np.ones(1, np.uint8), n), base, progress=False)
    return base


# ---------------------------------------------------------------- the server's log

def settle(server, quiet: float = 0.05) -> list:
    """The server's log once no entry has been added for `quiet` seconds (a response's entry may land
    just after its client has read it)."""
    seen = -1
    while len(server.requests) != seen:
        seen = len(server.requests)
        time.sleep(quiet)
    return list(server.requests)


def byte_range(entry) -> tuple[int, int] | None:
    """(start, end) of a logged request's Range (bytes=a-b), end exclusive; None for one without."""
    found = re.fullmatch(r"bytes=(\d+)-(\d+)", (entry.range or "").strip())
    return (int(found[1]), int(found[2]) + 1) if found else None


def tally(log: list) -> dict:
    """Requests and body bytes, by file; bytes fetched more than once; error statuses."""
    out = {"requests": len(log), "bytes": sum(e.sent for e in log), "by_file": {}, "twice": 0,
           "errors": sum(1 for e in log if e.status >= 400)}
    spans = collections.defaultdict(list)
    for entry in log:
        suffix = next((s for s in (".starts.npy", ".dat", ".json", ".digests") if entry.path.endswith(s)), entry.path)
        count, nbytes = out["by_file"].get(suffix, (0, 0))
        out["by_file"][suffix] = (count + 1, nbytes + entry.sent)
        span = byte_range(entry)
        spans[entry.path].append(span if span is not None else (0, entry.sent))
    for ranges in spans.values():  # bytes fetched beyond the union of the ranges
        ranges.sort()
        union, end = 0, 0
        for a, b in ranges:
            if b > end:
                union += b - max(a, end)
                end = b
        out["twice"] += sum(b - a for a, b in ranges) - union
    return out


# ---------------------------------------------------------------- peers: the requests each would issue

def megatron_requests(begin, end, order, size: int, chunk: int) -> list:
    """Megatron-LM's _S3BinReader: one cached block; a read outside it fetches the chunk-aligned block
    holding its start, extended to the read's end (the store stops at the object's end)."""
    out, lo, hi = [], 0, 0
    for i in order.tolist():
        b, e = int(begin[i]), int(end[i])
        if lo <= b and e <= hi:
            continue
        lo = b // chunk * chunk
        hi = max(lo + chunk, e)
        out.append((lo, min(hi, size)))
    return out


def per_item_requests(begin, end, order) -> list:
    """OLMo-core, Megatron's multi-storage client reader: a ranged request for each item's bytes."""
    b, e = begin[order], end[order]
    keep = e > b
    return list(zip(b[keep].tolist(), e[keep].tolist()))


def shard_bounds(begin, end, shard: int) -> np.ndarray:
    """Shards of whole items of at most `shard` bytes (an item larger than that alone), as MDSWriter
    closes a shard when the next item would take it past size_limit: the first item of each."""
    firsts, start = [0], int(begin[0]) if len(begin) else 0
    for i in range(1, len(begin)):
        if int(end[i]) - start > shard:
            firsts.append(i)
            start = int(begin[i])
    return np.array(firsts, np.int64)


def shard_requests(begin, end, order, shard: int, cap: int | None) -> list:
    """Whole shards downloaded on first touch and kept; with `cap`, at most cap of them, least recently
    used evicted."""
    firsts = shard_bounds(begin, end, shard)
    spans = np.append(begin[firsts], end[-1])
    which = np.searchsorted(firsts, order, side="right") - 1
    out, cached = [], collections.OrderedDict()
    for s in which.tolist():
        if s in cached:
            cached.move_to_end(s)
            continue
        out.append((int(spans[s]), int(spans[s + 1])))
        cached[s] = True
        if cap is not None and len(cached) > cap:
            cached.popitem(last=False)
    return out


def fetch(url: str, start: int, end: int, buffer: memoryview) -> int:
    """One ranged GET, its body read into buffer (reused): the bytes received."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
    got = 0
    with urllib.request.urlopen(request) as response:
        while True:
            n = response.readinto(buffer)
            if not n:
                return got
            got += n


def replay(server, url: str, requests: list, max_requests: int, max_bytes: int) -> dict:
    """Issue the requests one at a time (all, or the longest prefix within the budgets, at least one);
    the time of them all, extrapolated linearly from the prefix if cut; the log's count to check."""
    prefix, total = 0, 0
    for a, b in requests:
        if prefix and (prefix + 1 > max_requests or total + (b - a) > max_bytes):
            break
        prefix, total = prefix + 1, total + (b - a)
    buffer = memoryview(bytearray(max((b - a for a, b in requests[:prefix]), default=1)))
    server.reset_log()
    start = time.perf_counter()
    got = sum(fetch(url, a, b, buffer) for a, b in requests[:prefix])
    seconds = time.perf_counter() - start
    logged = tally(settle(server))
    assert got == total and logged["requests"] == prefix and logged["bytes"] == total, (got, total, logged)
    return {"seconds": seconds * len(requests) / max(prefix, 1), "replayed": prefix, "of": len(requests)}


# ---------------------------------------------------------------- traffic and passes

def picomap_pass(load, order, batch: int = BATCH) -> tuple[float, int]:
    """One pass in batches through __getitems__: seconds and the bytes of the items."""
    total = 0
    start = time.perf_counter()
    for k in range(0, len(order), batch):
        for x in load.__getitems__(order[k:k + batch]):
            total += x.nbytes
    return time.perf_counter() - start, total


def remote_loader(url: str, cache: Path, cap: int | None = None):
    kwargs = {"cache": str(cache)}
    if cap is not None:
        kwargs["cache_bytes"] = cap
    return pm.get_loader_fn(url, **kwargs)


def fmt_bytes(x: float) -> str:
    if x >= GiB:
        return f"{x / GiB:,.2f} GiB"
    return f"{x / MiB:,.1f} MiB" if x >= MiB else f"{x / 1024:,.1f} KiB"


def traffic(args, folder: Path, maps: Path, rounds: int) -> dict:
    from servers import RangeServer
    base = items_map(maps, args.items, args.item_kib)
    local, n = pm.get_loader_fn(base)
    row = local.data.dtype.itemsize * int(np.prod(local.data.shape[1:]))  # bytes a row
    begin = np.asarray(local.starts[:-1], np.int64) * row
    end = np.asarray(local.starts[1:], np.int64) * row
    dat_bytes = int(end[-1])
    files = pm.map_files(base)
    sizes = {p.name: p.stat().st_size for p in files if p.exists()}
    mean = dat_bytes / n
    block = max(1, int(args.block_mib * MiB // mean))
    orders = {"shuffled": np.fromiter(iter(pm.Sampler(n, seed=0)), np.int64, n),
              f"block={block} ({args.block_mib:g} MiB)": np.fromiter(iter(pm.Sampler(n, seed=0, block=block)),
                                                                   np.int64, n)}
    pieces = -(-dat_bytes // PIECE)
    print(f"### traffic: {n:,} items of {mean / 1024:.1f} KiB on average, {fmt_bytes(dat_bytes)} of items "
          f"({pieces:,} pieces of 1 MiB; offsets {fmt_bytes(sizes[files.starts.name])}), "
          f"{args.latency * 1e3:g} ms to first byte, batches of {BATCH}, medians of {rounds} rounds", flush=True)
    peers = {
        f"Megatron-LM S3 reader ({args.megatron_mib:g} MiB blocks)":
            lambda o: megatron_requests(begin, end, o, dat_bytes, int(args.megatron_mib * MiB)),
        "one ranged request per item (OLMo-core, Megatron MSC)": lambda o: per_item_requests(begin, end, o),
        f"whole {args.shard_mib:g} MiB shards, kept (MDS, LitData)":
            lambda o: shard_requests(begin, end, o, int(args.shard_mib * MiB), None),
        f"whole {args.shard_mib:g} MiB shards, {args.shard_cap} cached, LRU":
            lambda o: shard_requests(begin, end, o, int(args.shard_mib * MiB), args.shard_cap),
    }
    cap = int(args.cache_cap_mib * MiB) if args.cache_cap_mib and "cache_bytes" in inspect.signature(
        pm.get_loader_fn).parameters else None
    results, warm_cache, feedback = {}, None, []
    with RangeServer(maps) as server:
        server.delay(args.latency)
        url = f"{server.url.rstrip('/')}/{base.name}"
        dat_url = f"{url}.dat"
        for name, order in orders.items():
            rows = collections.defaultdict(list)
            for r in range(rounds):
                seconds, used = picomap_pass(local, order)
                rows["local"].append({"seconds": seconds})
                cache = folder / f"cache-{len(results)}-{r}"
                server.reset_log()
                start = time.perf_counter()
                load, _ = remote_loader(url, cache)
                opened = time.perf_counter() - start
                at_open = tally(settle(server))
                server.reset_log()
                seconds, got = picomap_pass(load, order)
                cold = tally(settle(server))
                assert got == used, (got, used)
                server.reset_log()
                warm_seconds, _ = picomap_pass(load, order)
                warm = tally(settle(server))
                rows["cold"].append({"seconds": seconds, "open": opened, "at_open": at_open, **cold})
                rows["warm"].append({"seconds": warm_seconds, **warm})
                if r == 0:  # the items are the local map's, byte for byte
                    check = order[:2000]
                    assert all(np.array_equal(a, b) for a, b in zip(load.__getitems__(check),
                                                                   local.__getitems__(check)))
                if cap is not None:  # on the first capped_items of the order: a capped cache is soon in its
                    server.reset_log()  # steady state, and a shuffled pass through it takes a request an item
                    capped, _ = remote_loader(url, folder / f"capped-{len(results)}-{r}", cap)
                    settle(server)
                    server.reset_log()
                    k = min(n, args.capped_items)
                    seconds, _ = picomap_pass(capped, order[:k])
                    got = tally(settle(server))
                    rows["capped"].append({"seconds": seconds * n / k, "requests": got["requests"] * n / k,
                                           "bytes": got["bytes"] * n / k, "prefix": k})
                    del capped
                    shutil.rmtree(folder / f"capped-{len(results)}-{r}", ignore_errors=True)
                for peer, requests_of in peers.items():
                    requests = requests_of(order)
                    done = replay(server, dat_url, requests, args.replay_requests, int(args.replay_gib * GiB))
                    rows[peer].append({**done, "requests": len(requests), "bytes": sum(b - a for a, b in requests)})
                print(f"  ({name}, round {r + 1} of {rounds} done: cold pass {rows['cold'][-1]['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
                if warm_cache is None and r == rounds - 1:
                    warm_cache = (url, cache)  # kept for the speed part
                else:
                    del load
                    gc.collect()
                    shutil.rmtree(cache, ignore_errors=True)
            results[name] = (rows, used)
            first = rows["cold"][0]
            over = first["requests"] - pieces - -(-sizes[files.starts.name] // PIECE) - 1
            if first["twice"]:
                feedback.append(f"{name}: {fmt_bytes(first['twice'])} fetched more than once in a cold pass")
            if over > 0:
                feedback.append(f"{name}: {first['requests']:,} requests in a cold pass, more than the "
                                f"{pieces:,} pieces of items and those of offsets and digests")
            if any(w["requests"] for w in rows["warm"]):
                feedback.append(f"{name}: the warm pass made {rows['warm'][0]['requests']} requests "
                                f"({fmt_bytes(rows['warm'][0]['bytes'])}), a full cache should make none")
            if any(c["errors"] for c in rows["cold"]):
                feedback.append(f"{name}: {rows['cold'][0]['errors']} requests answered with an error status")
        print("| order | contender | requests | requests / item | fetched | fetched / used | pass s | items/s "
              "| time × local | how |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, (rows, used) in results.items():
            local_s = [x["seconds"] for x in rows["local"]]
            for who, label in [("local", "picomap, local path (baseline)"), ("cold", "picomap remote, cold cache"),
                               ("warm", "picomap remote, warm cache (2nd pass)"),
                               ("capped", f"picomap remote, cache_bytes={args.cache_cap_mib or 0:g} MiB")] + \
                              [(p, p) for p in peers]:
                if who not in rows:
                    continue
                xs = rows[who]
                s = statistics.median(x["seconds"] for x in xs)
                ratio = statistics.median(x["seconds"] / b for x, b in zip(xs, local_s))
                if who == "local":
                    cells = ["0", "0", "-", "-"]
                    how = "-"
                else:
                    req, nbytes, k = xs[0]["requests"], xs[0]["bytes"], xs[0].get("prefix", n)
                    cells = [f"{'≈' * (k < n)}{req:,.0f}", f"{req / n:.4f}", fmt_bytes(nbytes),
                             f"{nbytes / used:,.2f}"]
                    if who in peers:
                        how = ("computed; replayed, all" if xs[0]["replayed"] == xs[0]["of"] else
                               f"computed; time from the first {xs[0]['replayed']:,} replayed")
                    else:
                        how = "server log" + (f" of the first {k:,} items, scaled" if k < n else "")
                print(f"| {name} | {label} | {' | '.join(cells)} | {s:,.2f} | {n / s:,.0f} | {ratio:,.1f}× | {how} |",
                      flush=True)
        colds = next(iter(results.values()))[0]["cold"]
        cold0, opened = colds[0], statistics.median(c["open"] for c in colds)
        print(f"\npicomap at open (cold cache): {cold0['at_open']['requests']} requests, "
              f"{fmt_bytes(cold0['at_open']['bytes'])}, {opened * 1e3:.1f} ms; "
              f"a cold pass's requests by file: "
              + ", ".join(f"{k} {v[0]:,} ({fmt_bytes(v[1])})" for k, v in cold0["by_file"].items()))
        out = {"local": local, "n": n, "warm": warm_cache, "feedback": feedback}
        if warm_cache is not None:
            out["speed"] = speed(warm_cache, local, n, rounds, args.picks, server)
        return out


def speed(warm, local, n: int, rounds: int, picks: int, server) -> dict:
    """A warm remote loader's load(i) and __getitems__ against the local loader's, same items."""
    url, cache = warm
    load, _ = remote_loader(url, cache)
    ks = np.random.default_rng(1).integers(0, n, picks).tolist()
    batches = [ks[k:k + BATCH] for k in range(0, len(ks), BATCH)]
    for loader in (local, load):
        for i in ks:
            loader(i)
    server.reset_log()
    t = collections.defaultdict(list)
    for r in range(rounds):
        for who, loader in (("local", local), ("remote", load)) if r % 2 == 0 else (("remote", load), ("local", local)):
            start = time.perf_counter()
            for i in ks:
                loader(i)
            t[f"{who} load(i)"].append((time.perf_counter() - start) / picks)
            start = time.perf_counter()
            for b in batches:
                loader.__getitems__(b)
            t[f"{who} __getitems__"].append((time.perf_counter() - start) / picks)
    requests = len(settle(server))
    print(f"\n### speed: warm cache, {picks:,} random items, medians of {rounds} rounds interleaved "
          f"({requests} requests during them)")
    print("| call | local map | remote map, warm cache | ratio |")
    print("|---|---|---|---|")
    for call in ("load(i)", "__getitems__"):
        a, b = t[f"local {call}"], t[f"remote {call}"]
        ratio = statistics.median(y / x for x, y in zip(a, b))
        label = call if call == "load(i)" else f"{call} (batches of {BATCH}, per item)"
        print(f"| `{label}` | {statistics.median(a) * 1e9:,.0f} ns | {statistics.median(b) * 1e9:,.0f} ns "
              f"| {ratio:.2f}× |")
    return {"requests": requests}


# ---------------------------------------------------------------- open, in a fresh process

def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def anonymous() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The highest RSS and anonymous memory seen while the block runs, above what they were at its start."""
    def __enter__(self):
        self.rss0, self.anon0 = status("VmRSS:"), anonymous()
        self.rss, self.anon, self.running = self.rss0, self.anon0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.rss, self.anon = max(self.rss, status("VmRSS:")), max(self.anon, anonymous())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.rss_growth = max(self.rss, status("VmRSS:")) - self.rss0
        self.anon_growth = max(self.anon, anonymous()) - self.anon0


def open_child(url: str, cache: str, traced: bool) -> None:
    """Open, report, wait for the parent's go, load a first item, report."""
    gc.collect()
    with Peak() as peak:
        if traced:
            tracemalloc.start()
        start = time.perf_counter()
        load, n = pm.get_loader_fn(url, cache=cache)
        seconds = time.perf_counter() - start
        traced_peak = tracemalloc.get_traced_memory()[1] if traced else None
    print(json.dumps({"seconds": seconds, "n": n, "traced": traced_peak, "rss": peak.rss_growth,
                      "anonymous": peak.anon_growth}), flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    item = load(n // 2)
    print(json.dumps({"first": time.perf_counter() - start, "nbytes": item.nbytes}), flush=True)


def open_once(server, url: str, cache: Path, traced: bool, timeout: float) -> dict:
    server.reset_log()
    child = subprocess.Popen([sys.executable, __file__, "--child", url, str(cache), str(int(traced))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(child.stderr.read().strip().splitlines()[-1:] or ["no output"])
        out = json.loads(line)
        out["at_open"] = tally(settle(server))
        server.reset_log()
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(child.stderr.read().strip().splitlines()[-1:] or ["no output"])
        out.update(json.loads(line))
        out["at_first"] = tally(settle(server))
        child.wait(timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return out


def open_part(args, folder: Path, maps: Path, sizes: list, rounds: int) -> list:
    from servers import RangeServer
    print(f"\n### open: maps of one-byte items, each open in a fresh process, {args.latency * 1e3:g} ms to first "
          f"byte; times medians of {rounds} processes")
    print("| items | offsets | requests at open | fetched at open | open, empty cache | open, warm cache "
          "| tracemalloc peak | RSS / anonymous growth | first item (requests) |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    feedback = []
    for n in sizes:
        need = 9 * n + 64 * MiB
        if not Path(f"{maps / f'byte-{n}'}.json").exists() and shutil.disk_usage(maps).free < 2 * need:
            print(f"| {n:.0e} | {fmt_bytes(8 * n)} | skipped: {fmt_bytes(2 * need)} of disk needed, "
                  f"{fmt_bytes(shutil.disk_usage(maps).free)} free | | | | | | |", flush=True)
            continue
        start = time.perf_counter()
        base = byte_map(maps, n)
        built = time.perf_counter() - start
        with RangeServer(maps) as server:
            server.delay(args.latency)
            url = f"{server.url.rstrip('/')}/{base.name}"
            cold, warm = [], []
            for r in range(rounds):
                cache = folder / f"open-{n}-{r}"
                cold.append(open_once(server, url, cache, False, args.timeout))
                warm.append(open_once(server, url, cache, False, args.timeout))
                shutil.rmtree(cache, ignore_errors=True)
            traced = open_once(server, url, folder / f"open-{n}-traced", True, args.timeout)
            shutil.rmtree(folder / f"open-{n}-traced", ignore_errors=True)
        c0 = cold[0]
        rss = statistics.median(x["rss"] for x in cold + [traced])
        anon = statistics.median(x["anonymous"] for x in cold + [traced])
        first = statistics.median(x["first"] for x in cold)
        warm_requests = warm[0]["at_open"]["requests"]
        print(f"| {n:.0e} | {fmt_bytes(8 * n + 8)} | {c0['at_open']['requests']} "
              f"({', '.join(f'{k} {v[0]}' for k, v in c0['at_open']['by_file'].items())}) | "
              f"{fmt_bytes(c0['at_open']['bytes'])} | {statistics.median(x['seconds'] for x in cold) * 1e3:,.1f} ms | "
              f"{statistics.median(x['seconds'] for x in warm) * 1e3:,.1f} ms ({warm_requests} requests) | "
              f"{fmt_bytes(traced['traced'])} | {fmt_bytes(rss)} / {fmt_bytes(anon)} | "
              f"{first * 1e3:,.1f} ms ({c0['at_first']['requests']}, {fmt_bytes(c0['at_first']['bytes'])}) |",
              flush=True)
        if max(rss, traced["traced"]) > 4 * MiB:
            feedback.append(f"open at {n:.0e}: memory {fmt_bytes(max(rss, traced['traced']))}, above 4 MiB")
        if warm_requests > 1:  # the json, always: it names the content hash the cache is kept under
            feedback.append(f"open at {n:.0e} with a warm cache: {warm_requests} requests")
        if built > 1:
            print(f"(built in {built:,.0f} s)")
        if not args.maps:
            for f in pm.map_files(base):
                f.unlink(missing_ok=True)
    return feedback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny maps, a few seconds")
    parser.add_argument("--latency", type=float, default=None,
                        help="seconds to first byte of each response (default 0.02; --quick 0.005)")
    parser.add_argument("--items", type=int, default=None, help="items of the traffic map (default 200,000)")
    parser.add_argument("--item-kib", type=float, default=8, help="their mean size; they span 0.5-1.5x it")
    parser.add_argument("--block-mib", type=float, default=4, help="MiB of a Sampler block for the block pass")
    parser.add_argument("--megatron-mib", type=float, default=None, help="Megatron's block (default 256)")
    parser.add_argument("--shard-mib", type=float, default=None, help="a shard of MDS/LitData (default 64)")
    parser.add_argument("--shard-cap", type=int, default=None, help="shards the capped cache keeps (default 4)")
    parser.add_argument("--cache-cap-mib", type=float, default=None,
                        help="also run picomap with cache_bytes of this many MiB (default 256; 0: not)")
    parser.add_argument("--replay-requests", type=int, default=None,
                        help="replay a peer's requests for real up to this many (default 500) ...")
    parser.add_argument("--replay-gib", type=float, default=None, help="... and this many GiB (default 4)")
    parser.add_argument("--capped-items", type=int, default=None,
                        help="items of each order the capped pass runs over, scaled to a pass (default 20,000)")
    parser.add_argument("--sizes", default=None, help="items of the open maps, comma-separated (default 1e6,1e8)")
    parser.add_argument("--maps", default=None, help="a folder where built maps are kept and reused")
    parser.add_argument("--folder", default=None, help="where caches and temporary maps go (default: the system's)")
    parser.add_argument("--parts", default="traffic,open", help="traffic (with speed), open, or both")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--picks", type=int, default=None, help="random items for the speed part")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before an open child is given up")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, cache, traced = args.child
        open_child(url, cache, traced == "1")
        return
    q = args.quick
    args.latency = (0.005 if q else 0.02) if args.latency is None else args.latency
    args.items = args.items or (3000 if q else 200_000)
    args.megatron_mib = args.megatron_mib or (4 if q else 256)
    args.shard_mib = args.shard_mib or (2 if q else 64)
    args.shard_cap = args.shard_cap or (2 if q else 4)
    args.cache_cap_mib = (4 if q else 256) if args.cache_cap_mib is None else args.cache_cap_mib
    args.replay_requests = args.replay_requests or (20 if q else 500)
    args.replay_gib = args.replay_gib or (0.05 if q else 4)
    args.capped_items = args.capped_items or (200 if q else 20_000)
    args.picks = args.picks or (2000 if q else 200_000)
    if q:
        args.block_mib = min(args.block_mib, 1)
    rounds = args.rounds or (1 if q else 3)
    sizes = [int(float(s)) for s in (args.sizes or ("1e4" if q else "1e6,1e8")).split(",")]
    if "cache" not in inspect.signature(pm.get_loader_fn).parameters:
        sys.exit("picomap.get_loader_fn takes no cache= here: this picomap has no remote maps")
    folder = Path(tempfile.mkdtemp(prefix="picomap-remote-", dir=args.folder))
    maps = Path(args.maps) if args.maps else folder
    maps.mkdir(parents=True, exist_ok=True)
    feedback = []
    try:
        if "traffic" in args.parts:
            feedback += traffic(args, folder, maps, rounds)["feedback"]
        if "open" in args.parts:
            feedback += open_part(args, folder, maps, sizes, rounds if q else max(rounds, 5))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n" + ("\n".join(f"- looked wrong: {f}" for f in feedback) if feedback else "nothing looked wrong"))


if __name__ == "__main__":
    main()
