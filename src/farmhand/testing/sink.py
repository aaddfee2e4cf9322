"""A real loopback webhook sink that honours ``Idempotency-Key`` and records every call.

Used by the demo, the tests and the benchmarks to watch what ``webhook.post`` really sends.
Standard library only: a :class:`http.server.ThreadingHTTPServer` speaking HTTP/1.1 with
keep-alive, one daemon thread per connection.

Semantics, per ``Idempotency-Key``:

* the first 2xx answer for a key is *the effect*: ``201`` with
  ``{"id": "eff-000001", "url": "<base>/effects/eff-000001"}``;
* any later call with that key is a *repeat*: it gets exactly the same status and body (plus an
  ``Idempotent-Replayed: true`` header), whatever its path, and creates nothing;
* a call without the header is recorded with key ``None`` and is its own effect every time.

The path chooses what a call that is not a repeat does (query parameters allowed):

==============================  ===========================================================
``/ok`` and any unknown path    effect
``/fail``                       ``500`` every time, no effect
``/reject``                     ``400``, no effect
``/ratelimit?retry_after=N``    ``429`` with ``Retry-After: N`` (default 1), no effect
``/echo-auth``                  ``500`` echoing the ``Authorization`` header (raw, and its
                                token base64- and URL-encoded) in the body, no effect: a
                                provider that leaks the credential into its error
``/slow?ms=N``                  sleep N ms (default 100), then effect
``/flaky?fail_times=N``         ``503`` for the first N (default 1) calls of each key, then
                                effect (calls without a key share one counter)
``GET /effects/<id>``           ``200`` with the effect's JSON, ``404`` if unknown
==============================  ===========================================================

Run it in the foreground with ``python -m farmhand.testing.sink --port 8765 --log calls.jsonl``;
the first line of stdout is its URL. With a log file every call is appended as one JSON line
as soon as it is answered, so another process can read it with :func:`load_log`.

The sink's threads share the GIL with whatever else runs in the process: a benchmark that keeps
an event loop busy (thousands of requests in flight) should run the sink in its own process
with ``-m farmhand.testing.sink`` rather than in-process.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, cast
from urllib.parse import parse_qs, quote, urlsplit

__all__ = ["SinkCall", "WebhookSink", "load_log", "main"]

#: status of the response that records an effect (and of its replays)
EFFECT_STATUS = 201
#: largest request body the sink reads
MAX_BODY_BYTES = 16 * 1024 * 1024
#: seconds an idle keep-alive connection is kept open
IDLE_TIMEOUT = 120.0
#: seconds :meth:`WebhookSink.stop` waits for connection threads to finish
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SinkCall:
    """One request the sink answered."""

    #: the ``Idempotency-Key`` header (UTF-8 bytes decoded), or None when the request had none
    key: str | None
    method: str
    #: the request target as sent: path plus query string
    path: str
    #: the body decoded as JSON; the raw text if it is not JSON; None if empty
    body: Any
    #: wall-clock arrival time (epoch seconds)
    at: float
    #: the status the sink answered with
    status: int
    #: this call created a new effect
    effect: bool
    #: this call's key already had an effect; it was answered with the stored response
    repeat: bool
    #: the ``Authorization`` header, or None when the request had none
    authorization: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The call as a JSON-serialisable dict (one log line)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SinkCall:
        """Rebuild a call from :meth:`to_json` output (unknown fields are ignored)."""
        key = data.get("key")
        return cls(
            key=None if key is None else str(key),
            method=str(data["method"]),
            path=str(data["path"]),
            body=data.get("body"),
            at=float(data["at"]),
            status=int(data["status"]),
            effect=bool(data["effect"]),
            repeat=bool(data["repeat"]),
            authorization=None if data.get("authorization") is None else str(data["authorization"]),
        )


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    """The request cannot be read; answered with 400 and the connection closed."""


def _json_reply(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, json.dumps(data, separators=(",", ":")).encode("utf-8"), headers)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _json_reply(status, {"error": message}, headers)


def _decode_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def _header_text(value: str | None) -> str | None:
    """Undo http.server's latin-1 decoding of a header sent as UTF-8 bytes."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _echo(authorization: str | None) -> dict[str, Any]:
    """What ``/echo-auth`` leaks: the header, and its token base64- and URL-encoded."""
    token = (authorization or "").partition(" ")[2] or (authorization or "")
    return {
        "error": "echo",
        "auth": authorization,
        "b64": base64.b64encode(token.encode("utf-8")).decode("ascii"),
        "url": quote(token, safe=""),
    }


def _int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    text = values[-1].strip()
    if not text.isdigit():
        raise ValueError(f"query parameter {name} must be a non-negative integer, got {text!r}")
    return int(text)


class WebhookSink:
    """A loopback HTTP server that records calls and honours ``Idempotency-Key``.

    Use it as a context manager (``with WebhookSink() as sink:``) or call :meth:`start` and
    :meth:`stop`. Every query method is thread-safe and returns a copy. Recorded calls and
    effects survive :meth:`stop`; starting again rebinds the same port and keeps them, like a
    target that restarts without losing its data.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self._cond = threading.Condition(threading.Lock())
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log: IO[str] | None = None
        self._url = ""
        # everything below is guarded by self._cond
        self._arrivals = 0
        self._calls: dict[int, SinkCall] = {}
        self._effects: dict[str, SinkCall] = {}
        self._replies: dict[str, _Reply] = {}
        self._documents: dict[str, dict[str, Any]] = {}
        self._flaky_counts: dict[str | None, int] = {}
        self._effect_count = 0
        self._repeats = 0
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (only once started)."""
        if not self._url:
            raise RuntimeError("WebhookSink is not started; call start() or use it in a with")
        return self._url

    def start(self) -> WebhookSink:
        """Bind, open the log and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("WebhookSink is already started")
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        try:
            if self.log_path is not None:
                self._log = self.log_path.open("a", encoding="utf-8")
        except BaseException:
            server.server_close()
            raise
        self._server = server
        bound_host, bound_port = server.server_address[:2]
        host = str(bound_host)
        self.port = int(bound_port)
        self._url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"webhook-sink:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and close the log. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            with self._cond:
                connections = list(self._connections)
                handlers = [t for t in self._handlers if t is not threading.current_thread()]
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            remaining = deadline - time.monotonic()
            if not handlers or remaining <= 0:
                break
            for thread in handlers:
                thread.join(max(0.0, min(0.1, deadline - time.monotonic())))
        server.server_close()
        with self._cond:
            log, self._log = self._log, None
        if log is not None:
            log.close()

    def __enter__(self) -> WebhookSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------------------------

    def calls(self) -> list[SinkCall]:
        """Every answered GET/POST/PUT/PATCH/DELETE request, in arrival order."""
        with self._cond:
            return [self._calls[seq] for seq in sorted(self._calls)]

    def effects(self) -> dict[str, SinkCall]:
        """``Idempotency-Key`` -> the call that produced its effect (keyless calls excluded)."""
        with self._cond:
            return dict(self._effects)

    def repeated_calls(self) -> int:
        """How many calls carried a key that already had an effect."""
        with self._cond:
            return self._repeats

    def wait_for_calls(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` calls were answered; False if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._calls) >= n, timeout)

    # -- request handling (called from connection threads) -----------------------------------

    def _arrive(self) -> int:
        with self._cond:
            self._arrivals += 1
            return self._arrivals

    def _connected(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.add(conn)
            self._handlers.add(threading.current_thread())

    def _disconnected(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)
            self._handlers.discard(threading.current_thread())

    def _record(self, seq: int, call: SinkCall) -> None:
        """Store ``call``; the caller holds ``self._cond``."""
        self._calls[seq] = call
        if call.repeat:
            self._repeats += 1
        if self._log is not None:
            self._log.write(json.dumps({"seq": seq, **call.to_json()}) + "\n")
            self._log.flush()
        self._cond.notify_all()

    def _replay(self, key: str | None) -> _Reply | None:
        """The stored answer for ``key`` if it already has an effect; caller holds the lock."""
        stored = self._replies.get(key) if key is not None else None
        if stored is None:
            return None
        return _Reply(
            stored.status, stored.body, (*stored.headers, ("Idempotent-Replayed", "true"))
        )

    def _answer(
        self,
        seq: int,
        at: float,
        method: str,
        target: str,
        key: str | None,
        raw: bytes | None,
        authorization: str | None = None,
    ) -> _Reply:
        """Decide the reply to one request and record it. ``raw`` None: unreadable body."""
        body = _decode_body(raw) if raw is not None else None

        def record(reply: _Reply, *, effect: bool = False, repeat: bool = False) -> _Reply:
            call = SinkCall(
                key, method, target, body, at, reply.status, effect, repeat, authorization
            )
            self._record(seq, call)
            return reply

        if raw is None:
            with self._cond:
                return record(_error(400, "unreadable request body"))
        parts = urlsplit(target)
        route = parts.path.rstrip("/") or "/"
        if method == "GET" and route.startswith("/effects/"):
            with self._cond:
                document = self._documents.get(route.removeprefix("/effects/"))
                reply = (
                    _json_reply(200, document)
                    if document is not None
                    else _error(404, f"no effect {route.removeprefix('/effects/')}")
                )
                return record(reply)
        query = parse_qs(parts.query)
        try:
            retry_after = _int_param(query, "retry_after", 1)
            delay_ms = _int_param(query, "ms", 100)
            fail_times = _int_param(query, "fail_times", 1)
        except ValueError as exc:
            with self._cond:
                replayed = self._replay(key)
                if replayed is not None:
                    return record(replayed, repeat=True)
                return record(_error(400, str(exc)))
        if route == "/slow" and self._stopping.wait(delay_ms / 1000):
            with self._cond:
                return record(_error(503, "sink is stopping"))
        with self._cond:
            replayed = self._replay(key)
            if replayed is not None:
                return record(replayed, repeat=True)
            if route == "/fail":
                return record(_error(500, "simulated server error"))
            if route == "/reject":
                return record(_error(400, "simulated rejection"))
            if route == "/echo-auth":
                return record(_json_reply(500, _echo(authorization)))
            if route == "/ratelimit":
                return record(
                    _error(429, "simulated rate limit", (("Retry-After", str(retry_after)),))
                )
            if route == "/flaky":
                count = self._flaky_counts[key] = self._flaky_counts.get(key, 0) + 1
                if count <= fail_times:
                    return record(_error(503, f"simulated outage ({count} of {fail_times})"))
            self._effect_count += 1
            effect_id = f"eff-{self._effect_count:06d}"
            receipt = {"id": effect_id, "url": f"{self._url}/effects/{effect_id}"}
            reply = _json_reply(EFFECT_STATUS, receipt)
            self._documents[effect_id] = {
                **receipt,
                "key": key,
                "method": method,
                "path": target,
                "body": body,
                "at": at,
            }
            record(reply, effect=True)
            if key is not None:
                self._replies[key] = reply
                self._effects[key] = self._calls[seq]
            return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sink: WebhookSink) -> None:
        self.sink = sink
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server_version = "farmhand-webhook-sink"
    # buffer each response and send it in one write (see _serve); with TCP_NODELAY this avoids
    # the ~40 ms Nagle/delayed-ACK stall per keep-alive request
    wbufsize = 64 * 1024

    @property
    def sink(self) -> WebhookSink:
        return cast(_Server, self.server).sink

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sink._connected(self.connection)

    def finish(self) -> None:
        self.sink._disconnected(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and not self.sink._stopping.is_set():
            self.handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request logging to stderr."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _BadRequest("body too large")
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _BadRequest("truncated chunk")
                chunks.append(chunk)
                self.rfile.readline(3)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if n < 0 or n > MAX_BODY_BYTES:
            raise _BadRequest("bad Content-Length")
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise _BadRequest("truncated body")
        return raw

    def _serve(self) -> None:
        sink = self.sink
        seq = sink._arrive()
        at = time.time()
        raw: bytes | None
        try:
            raw = self._read_body()
        except (_BadRequest, OSError):
            raw = None
            self.close_connection = True
        reply = sink._answer(
            seq,
            at,
            self.command,
            self.path,
            _header_text(self.headers.get("Idempotency-Key")),
            raw,
            _header_text(self.headers.get("Authorization")),
        )
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            if self.close_connection or sink._stopping.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


def load_log(path: Path) -> list[SinkCall]:
    """The calls recorded in a sink's log file, in arrival order.

    A partly written last line (the sink is still running) is skipped.
    """
    entries: list[tuple[int, SinkCall]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a sink log line") from None
        entries.append((int(data.get("seq", number)), SinkCall.from_json(data)))
    entries.sort(key=lambda entry: entry[0])
    return [call for _, call in entries]


def main(argv: list[str] | None = None) -> int:
    """Run a sink in the foreground until SIGINT or SIGTERM; print its URL first."""
    parser = argparse.ArgumentParser(
        prog="python -m farmhand.testing.sink",
        description="Loopback webhook sink that honours Idempotency-Key and records calls.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per call")
    args = parser.parse_args(argv)

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    with WebhookSink(host=args.host, port=args.port, log_path=args.log) as sink:
        print(sink.url, flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
