"""Loopback servers for the remote-reading tests and benchmarks (a helper module, not a test file).

RangeServer: an HTTP/1.1 file server on 127.0.0.1 that answers single byte ranges and If-Match, logs
every request, and takes injected faults. S3Server: moto's S3 on 127.0.0.1, with the environment
that sends s3fs (in this process and in children it starts, spawned or forked) there. Nothing here
listens or connects beyond 127.0.0.1.
"""
import contextlib
import email.utils
import logging
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 1 << 20
UNSATISFIABLE = "unsatisfiable"


@dataclass
class Request:
    """One request in RangeServer's log. It enters the log just before its status line goes out and
    sent grows before each write, so a client that has read a response finds it complete here."""
    method: str
    path: str  # the URL's path, percent-decoded, without its query
    range: str | None  # the Range header as sent
    status: int = 0
    sent: int = 0  # bytes of body written (less than Content-Length when a fault cut it)


@dataclass
class _Fault:
    kind: str  # "fail", "cut" or "wrong_range"
    path: str | None  # None: any path
    times: int
    status: int = 0  # for "fail"
    keep: object = None  # for "cut": body length -> how many of its bytes to send


def _url_path(path) -> str | None:
    return None if path is None else "/" + str(path).lstrip("/")


def _etag(st) -> str:
    """A strong tag that changes when the file is replaced (new inode) or rewritten."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def _if_match(header: str | None, etag: str) -> bool:
    """Whether an If-Match header lets the request through (strong comparison: a W/ tag never does)."""
    if header is None:
        return True
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or etag in tags


def _parse_range(header: str | None, size: int):
    """(first, last) inclusive for one satisfiable byte range; UNSATISFIABLE; or None to answer the
    whole file: no Range, a malformed one (ignored, as RFC 9110 allows), or several ranges."""
    unit, _, spec = (header or "").partition("=")
    first, dash, last = spec.strip().partition("-")
    digits = all(part.isdigit() for part in (first, last) if part)
    if unit.strip().lower() != "bytes" or not dash or not (first or last) or not digits:
        return None
    if not first:  # bytes=-n: the last n bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n and size else UNSATISFIABLE
    start = int(first)
    if last and int(last) < start:
        return None
    return (start, min(int(last or size), size - 1)) if start < size else UNSATISFIABLE


def _shifted(first: int, last: int, size: int) -> tuple[int, int]:
    """A range other than the one asked: a byte later, or a byte earlier at the file's end, or a
    byte shorter when it spans the whole file."""
    if last + 1 < size:
        return first + 1, last + 1
    if first > 0:
        return first - 1, last - 1
    return first + 1, last


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD of the files under the owner's root, keep-alive, faults as the owner says."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else a body written after its headers can wait for a delayed ACK

    def setup(self):
        super().setup()
        self.server.owner._connected(self.connection)

    def finish(self):
        self.server.owner._disconnected(self.connection)
        super().finish()

    def log_message(self, format, *args):  # the owner keeps its own log
        pass

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def _serve(self):
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.record = Request(self.command, path, self.headers.get("Range"))
        fault = owner._take("fail", path)
        if fault:
            retry = {"Retry-After": "0"} if fault.status in (429, 503) else {}
            return self._short(fault.status, retry)
        try:
            file = open(owner._local(path), "rb")
        except OSError:  # missing, a folder, or outside the root
            return self._short(404)
        with file:
            self._serve_file(owner, path, file)

    def _serve_file(self, owner, path, file):
        st = os.fstat(file.fileno())
        size, etag = st.st_size, _etag(st)
        headers = {"ETag": etag, "Accept-Ranges": "bytes",
                   "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True)}
        if not _if_match(self.headers.get("If-Match"), etag):
            return self._short(412, headers)
        span = None if self.command != "GET" or owner.ignore_range else _parse_range(self.record.range, size)
        if span == UNSATISFIABLE:
            return self._short(416, {**headers, "Content-Range": f"bytes */{size}"})
        if span is None:
            status, first, last = 200, 0, size - 1
        else:
            status, (first, last) = 206, _shifted(*span, size) if owner._take("wrong_range", path) else span
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = last - first + 1
        self._head(status, length, {**headers, "Content-Type": "application/octet-stream"})
        if self.command == "GET":
            cut = owner._take("cut", path)
            self._send_file(owner, path, file, first, length if cut is None else cut.keep(length))
            self.close_connection |= cut is not None

    def _head(self, status: int, length: int, headers: dict):
        """The status line and headers, after the owner's delay; the request enters the log here."""
        self.server.owner._before_response(self.record, status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _short(self, status: int, headers: dict | None = None):
        """A response with a one-line body naming the status."""
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self._head(status, len(body), {**(headers or {}), "Content-Type": "text/plain"})
        if self.command != "HEAD":
            self._write(body)

    def _send_file(self, owner, path, file, first: int, count: int):
        """count bytes of the file from first, with the owner's flipped bytes; a file that turns out
        shorter than its fstat said leaves the body short, and the connection is closed."""
        file.seek(first)
        pos, end = first, first + count
        while pos < end:
            chunk = file.read(min(CHUNK, end - pos))
            if not chunk or not self._write(owner._flipped(path, pos, chunk)):
                self.close_connection = True
                return
            pos += len(chunk)

    def _write(self, data) -> bool:
        """Write data and count it in the log; False when the client has gone."""
        self.record.sent += len(data)
        try:
            self.wfile.write(data)
            return True
        except OSError:
            self.record.sent -= len(data)
            return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client gone, or the server stopping
            super().handle_error(request, client_address)


class RangeServer:
    """Serves the files under root at `url` (http://127.0.0.1:PORT), as a context manager.

    GET and HEAD send Content-Length, a strong ETag from the file's (st_ino, st_size, st_mtime_ns),
    Accept-Ranges: bytes and Last-Modified. GET with one byte range (bytes=a-b, a-, -n) answers 206
    with Content-Range, or 416 with Content-Range: bytes */size; several ranges, or a malformed
    Range, get 200 and the whole file (HEAD ignores Range). If-Match (a list, or *) that the current
    ETag does not match gets 412. Missing files and folders get 404. Connections are kept alive.
    `requests` logs every GET and HEAD (other methods get the stdlib's 501, unlogged).

    Faults (thread-safe, settable while it runs) are scoped to one URL path ("/a/b" or "a/b") or to
    all (None); each request takes at most one fault of each kind, the oldest matching first.
    """

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.url = None
        self.ignore_range = False  # True: answer 200 and the whole file even when a range is asked
        self._lock = threading.Lock()
        self._log: list[Request] = []
        self._faults: list[_Fault] = []
        self._flips: dict[str, set[int]] = {}
        self._delay = 0.0
        self._stopping = threading.Event()
        self._connections = set()

    def __enter__(self):
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="RangeServer")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        """Stop: end the accept loop, close kept-alive connections, join every thread."""
        self._stopping.set()
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        self._thread.join()

    @property
    def requests(self) -> list[Request]:
        """A copy of the log, oldest first."""
        with self._lock:
            return list(self._log)

    def reset_log(self):
        with self._lock:
            self._log.clear()

    def fail(self, status=503, times=1, path=None):
        """The next `times` matching requests (GET or HEAD) answer `status` with a one-line body,
        and Retry-After: 0 for 503 and 429."""
        self._add(_Fault("fail", _url_path(path), times, status=status))

    def truncate(self, path=None, times=1):
        """The next `times` matching GETs promise their whole Content-Length but send only half the
        body, then close the connection (the client reads a short body: IncompleteRead)."""
        self._add(_Fault("cut", _url_path(path), times, keep=lambda length: length // 2))

    def drop(self, path=None, times=1, after=0):
        """The next `times` matching GETs close the connection after `after` bytes of body."""
        self._add(_Fault("cut", _url_path(path), times, keep=lambda length: min(after, length)))

    def wrong_range(self, path=None, times=1):
        """The next `times` matching GETs that would answer 206 answer another range (see _shifted),
        with its Content-Range and its data."""
        self._add(_Fault("wrong_range", _url_path(path), times))

    def corrupt(self, path, offset: int):
        """Every response that covers this byte of the file sends it XOR 0xFF (the disk keeps it)."""
        with self._lock:
            self._flips.setdefault(_url_path(path), set()).add(offset)

    def delay(self, seconds: float):
        """Wait this long before each response's first byte (0 to stop); stopping the server cuts it short."""
        self._delay = seconds

    def clear_faults(self):
        """Forget every pending fault, flipped byte and delay, and honour ranges again."""
        with self._lock:
            self._faults.clear()
            self._flips.clear()
        self._delay, self.ignore_range = 0.0, False

    def _add(self, fault: _Fault):
        with self._lock:
            self._faults.append(fault)

    def _take(self, kind: str, path: str) -> _Fault | None:
        """The oldest pending fault of this kind for path, counted as used once more."""
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.path in (None, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _flipped(self, path: str, pos: int, chunk: bytes) -> bytes:
        """The chunk of path's file at pos, with the corrupt bytes it covers flipped."""
        with self._lock:
            offsets = [offset - pos for offset in self._flips.get(path, ()) if pos <= offset < pos + len(chunk)]
        if not offsets:
            return chunk
        flipped = bytearray(chunk)
        for offset in offsets:
            flipped[offset] ^= 0xFF
        return flipped

    def _local(self, url_path: str) -> Path:
        local = (self.root / url_path.lstrip("/")).resolve()
        if not local.is_relative_to(self.root):
            raise FileNotFoundError(url_path)
        return local

    def _before_response(self, record: Request, status: int):
        self._stopping.wait(self._delay)
        record.status = status
        with self._lock:
            self._log.append(record)

    def _connected(self, connection):
        with self._lock:
            self._connections.add(connection)
            stopping = self._stopping.is_set()
        if stopping:  # accepted while __exit__ was closing the others
            connection.shutdown(socket.SHUT_RDWR)

    def _disconnected(self, connection):
        with self._lock:
            self._connections.discard(connection)


def _set_environment(values: dict) -> dict:
    """Set (or, for None, remove) environment variables; returns what they were."""
    before = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return before


def _forget_s3fs_instances():
    """Drop s3fs's cached filesystems (and with them their listings and endpoint), if s3fs is loaded."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()


class S3Server:
    """moto's S3 on 127.0.0.1 (a free port) at `endpoint`, as a context manager.

    While it is entered, the process's environment (`env`) sends every AWS client there:
    AWS_ENDPOINT_URL, which botocore (so aiobotocore, so s3fs) reads each time a client is made, so it
    works whenever s3fs was imported and in children that inherit the environment (spawn or fork);
    test credentials and region; no profile, config file or instance metadata. Exit restores the
    environment, forgets s3fs's cached filesystems and stops the server. start()/stop() without
    entering leave the environment alone (the pytest fixture sets `env` per test).
    """

    def __init__(self):
        self.endpoint = None
        self._moto = None
        self._client = None

    @property
    def env(self) -> dict:
        """The environment a client needs (None: unset)."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": None,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": None, "AWS_SECURITY_TOKEN": None, "AWS_PROFILE": None,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
                "NO_PROXY": no_proxy, "no_proxy": no_proxy}

    def __enter__(self):
        self.start()
        self._saved = _set_environment(self.env)
        _forget_s3fs_instances()
        return self

    def __exit__(self, *exc):
        _set_environment(self._saved)
        _forget_s3fs_instances()
        self.stop()

    def start(self) -> "S3Server":
        """Start moto's server (quiet) with no buckets."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as error:
            raise RuntimeError("S3Server needs moto's server: pip install 'moto[server]' "
                               "(in picomap's test extra)") from error
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else it prints each request
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        self.endpoint = "http://{}:{}".format(*self._moto.get_host_and_port())
        self.reset()
        return self

    def stop(self):
        """Stop the server and close its socket (moto's stop() leaves it open)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._moto.stop()
        self._moto._server.server_close()

    def reset(self):
        """Remove every bucket (moto's state is per process, shared by all its servers) and s3fs's
        cached filesystems."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", data=b"", method="POST")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10):
            pass
        _forget_s3fs_instances()

    @property
    def client(self):
        """A boto3 S3 client for this server (made once, closed on stop)."""
        if self._client is None:
            import boto3
            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                        aws_access_key_id="testing", aws_secret_access_key="testing")
        return self._client

    def make_bucket(self, name: str):
        self.client.create_bucket(Bucket=name)

    def upload(self, source, url: str) -> str:
        """Put a local file (a path) or bytes at s3://bucket/key; returns the object's ETag (quoted)."""
        bucket, key = self._split(url)
        body = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        return self.client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]

    def replace(self, source, url: str) -> str:
        """Overwrite an object that exists (KeyError if it does not); returns its new ETag."""
        bucket, key = self._split(url)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except self.client.exceptions.ClientError as error:
            raise KeyError(url) from error
        return self.upload(source, url)

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.path.lstrip("/"):
            raise ValueError(f"not s3://bucket/key: {url}")
        return parts.netloc, parts.path.lstrip("/")
