"""The loopback servers of tests/servers.py do what the remote-reading tests rely on."""
import contextlib
import http.client
import multiprocessing
import os
import threading
import time

import pytest

from servers import RangeServer, S3Server

DATA = bytes(range(256)) * 4  # 1024 bytes, each byte telling its offset mod 256


@pytest.fixture
def served(range_server, tmp_path):
    (tmp_path / "a.bin").write_bytes(DATA)
    (tmp_path / "sub").mkdir()
    return range_server


def connect(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)


def ask(server, path="/a.bin", method="GET", connection=None, **headers):
    """One request, on connection or on a new one closed after it; returns (status, headers, body)."""
    with contextlib.nullcontext(connection) if connection else contextlib.closing(connect(server)) as using:
        using.request(method, path, headers=headers)
        response = using.getresponse()
        return response.status, response.headers, response.read()


@pytest.mark.parametrize("asked, status, content_range, body", [
    ("bytes=10-19", 206, "bytes 10-19/1024", DATA[10:20]),
    ("bytes=1000-", 206, "bytes 1000-1023/1024", DATA[1000:]),
    ("bytes=-5", 206, "bytes 1019-1023/1024", DATA[-5:]),
    ("bytes=1020-5000", 206, "bytes 1020-1023/1024", DATA[1020:]),
    ("bytes=1024-", 416, "bytes */1024", None),
    ("bytes=0-1,5-6", 200, None, DATA),  # several ranges: the whole file
    ("bytes=9-3", 200, None, DATA),  # malformed: ignored
])
def test_ranges(served, asked, status, content_range, body):
    got_status, headers, got_body = ask(served, Range=asked)
    assert (got_status, headers["Content-Range"]) == (status, content_range)
    assert body is None or got_body == body
    assert int(headers["Content-Length"]) == len(got_body)


def test_head_headers_404_and_one_kept_alive_connection(served):
    connection = connect(served)
    status, headers, body = ask(served, method="HEAD", connection=connection, Range="bytes=0-9")
    assert (status, body, headers["Content-Length"], headers["Accept-Ranges"]) == (200, b"", "1024", "bytes")
    assert headers["ETag"].startswith('"') and headers["Last-Modified"]
    socket = connection.sock
    for path in ("/missing.bin", "/sub", "/sub/", "/../a.bin", "/%2e%2e/a.bin"):
        assert ask(served, path, connection=connection)[0] == 404
    assert ask(served, connection=connection)[0] == 200
    assert connection.sock is socket  # every answer kept the connection
    connection.close()


def test_ignore_range_sends_the_whole_file(served):
    served.ignore_range = True
    status, headers, body = ask(served, Range="bytes=10-19")
    assert (status, body, headers["Content-Range"]) == (200, DATA, None)


def test_if_match_fails_once_the_file_is_replaced(served, tmp_path):
    etag = ask(served, method="HEAD")[1]["ETag"]
    assert ask(served, Range="bytes=0-3", **{"If-Match": etag})[0] == 206
    (tmp_path / "new.bin").write_bytes(DATA)  # the same bytes, another file
    os.replace(tmp_path / "new.bin", tmp_path / "a.bin")
    status, headers, _ = ask(served, Range="bytes=0-3", **{"If-Match": etag})
    assert status == 412 and headers["ETag"] not in (etag, None)
    assert ask(served, **{"If-Match": "*"})[0] == 200
    assert ask(served, **{"If-Match": f'"x", {headers["ETag"]}'})[0] == 200


def test_fail_answers_the_status_n_times_on_its_path(served, tmp_path):
    (tmp_path / "b.bin").write_bytes(b"b")
    served.fail(503, times=2, path="a.bin")
    first, second = ask(served), ask(served)
    assert ask(served, "/b.bin")[0] == 200
    assert [first[0], second[0], ask(served)[0]] == [503, 503, 200]
    assert first[1]["Retry-After"] == "0" and first[2].startswith(b"503")
    for status in (429, 403, 404, 500):
        served.fail(status)
        assert ask(served, "/b.bin")[0] == status
    assert ask(served, "/b.bin")[0] == 200


@pytest.mark.parametrize("cut, kept", [("truncate", 512), ("drop", 100)])
def test_a_cut_body_raises_incomplete_read(served, cut, kept):
    getattr(served, cut)(**({"after": 100} if cut == "drop" else {}))
    with pytest.raises(http.client.IncompleteRead) as raised:
        ask(served)
    assert (len(raised.value.partial), raised.value.expected) == (kept, 1024 - kept)
    assert served.requests[-1].sent == kept
    assert ask(served)[2] == DATA  # once only


def test_a_corrupt_byte_is_flipped_in_every_answer_covering_it(served, tmp_path):
    served.corrupt("/a.bin", 300)
    body = ask(served)[2]
    assert body[300] == DATA[300] ^ 0xFF and body[:300] + body[301:] == DATA[:300] + DATA[301:]
    assert ask(served, Range="bytes=299-301")[2] == bytes([DATA[299], DATA[300] ^ 0xFF, DATA[301]])
    assert ask(served, Range="bytes=0-299")[2] == DATA[:300]
    assert (tmp_path / "a.bin").read_bytes() == DATA


def test_wrong_range_answers_a_shifted_range(served):
    served.wrong_range()
    status, headers, body = ask(served, Range="bytes=10-19")
    assert (status, headers["Content-Range"], body) == (206, "bytes 11-20/1024", DATA[11:21])
    served.wrong_range()
    assert ask(served, Range="bytes=-4")[1]["Content-Range"] == "bytes 1019-1022/1024"
    assert ask(served, Range="bytes=10-19")[1]["Content-Range"] == "bytes 10-19/1024"


def test_delay_and_clear_faults(served):
    served.delay(0.2)
    served.corrupt("a.bin", 0)
    start = time.perf_counter()
    ask(served, method="HEAD")
    assert time.perf_counter() - start >= 0.2
    served.clear_faults()
    start = time.perf_counter()
    assert ask(served)[2] == DATA
    assert time.perf_counter() - start < 0.2


def test_the_log_counts_requests_and_body_bytes(served):
    ask(served, Range="bytes=0-99")
    ask(served, method="HEAD")
    ask(served, "/missing.bin")
    log = served.requests
    assert [(r.method, r.path, r.range, r.status) for r in log] == [
        ("GET", "/a.bin", "bytes=0-99", 206), ("HEAD", "/a.bin", None, 200),
        ("GET", "/missing.bin", None, 404)]
    assert [r.sent for r in log[:2]] == [100, 0] and log[2].sent > 0
    served.reset_log()
    assert served.requests == []


def test_stopping_closes_kept_alive_connections_and_joins_threads(tmp_path):
    (tmp_path / "a.bin").write_bytes(DATA)
    threads = threading.active_count()
    with RangeServer(tmp_path) as server:
        connection = connect(server)
        assert ask(server, connection=connection)[0] == 200  # left open, its handler waiting
    assert threading.active_count() == threads
    assert connection.sock.recv(1) == b""  # the server closed it
    connection.close()


def read_in_child(path):
    import fsspec
    return fsspec.filesystem("s3").cat_file(path, start=2, end=6)


def test_s3_ranges_etag_and_a_spawned_child(s3_server):
    import fsspec
    s3_server.make_bucket("maps")
    etag = s3_server.upload(DATA, "s3://maps/toy/a.bin")
    fs = fsspec.filesystem("s3")
    assert fs.cat_file("maps/toy/a.bin", start=10, end=14) == DATA[10:14]  # start/end by keyword
    assert fs.info("maps/toy/a.bin")["ETag"] == etag and etag.startswith('"')
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(read_in_child, ("maps/toy/a.bin",)) == DATA[2:6]


def test_s3_replace_expires_a_file_opened_before(s3_server):
    import fsspec
    from s3fs.utils import FileExpired
    s3_server.make_bucket("maps")
    s3_server.upload(DATA, "s3://maps/a.bin")
    fs = fsspec.filesystem("s3")
    with fs.open("maps/a.bin", "rb", cache_type="none") as file:
        assert file.read(4) == DATA[:4]
        new_etag = s3_server.replace(b"other", "s3://maps/a.bin")
        with pytest.raises(FileExpired):
            file.read(4)  # s3fs reads with If-Match: moto answers 412
    assert fs.info("maps/a.bin")["ETag"] == new_etag
    with pytest.raises(KeyError):
        s3_server.replace(b"x", "s3://maps/none")


def test_s3_server_as_a_context_manager_restores_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "someone")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with S3Server() as server:
        assert os.environ["AWS_ENDPOINT_URL"] == server.endpoint and "AWS_PROFILE" not in os.environ
        server.make_bucket("maps")
    assert os.environ["AWS_PROFILE"] == "someone" and "AWS_ENDPOINT_URL" not in os.environ
