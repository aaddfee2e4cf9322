"""A loopback stand-in of the X API v2, for tests and demos of ``x.post``.

It is a real HTTP server on 127.0.0.1 (standard library :mod:`http.server`, one thread per
connection) for one account, and it checks what X checks:

* every request is authenticated: an OAuth 1.0a signature is verified with :mod:`oauthlib`'s
  server side (client key, access token, HMAC-SHA1 signature over method, URL and query,
  timestamp and a never-reused nonce), or the OAuth 2.0 bearer token is compared; anything
  else is ``401``;
* ``POST /2/tweets`` (``text``, ``reply.in_reply_to_tweet_id``, ``quote_tweet_id``) stores a
  post and answers ``201 {"data": {"id", "text", "edit_history_tweet_ids"}}``; the same text
  as an existing post is ``403`` duplicate content; a reply to or quote of an unknown post is
  ``403``; a malformed body is ``400``;
* ``GET /2/users/me`` and ``GET /2/users/:id/tweets`` (``start_time``, ``end_time``,
  ``max_results``, ``pagination_token``, ``tweet.fields``) serve the account and its
  timeline, newest first, with text HTML-escaped and links shortened to t.co as X does.

Tests script the next create calls: :meth:`XApiStandIn.rate_limit_next` (``429`` with
``x-rate-limit-reset``), :meth:`~XApiStandIn.fail_next` (a 5xx, with or without the post
made), :meth:`~XApiStandIn.drop_next_response` (the post is made, the connection closed
without an answer) and :meth:`~XApiStandIn.stall_next` (the post is made, the answer late).
"""

from __future__ import annotations

import contextlib
import hmac
import html
import itertools
import json
import re
import secrets
import socket
import socketserver
import string
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

from oauthlib.common import Request
from oauthlib.oauth1 import SIGNATURE_HMAC_SHA1, RequestValidator, ResourceEndpoint

__all__ = ["XApiStandIn", "XPost", "XRequest"]

_MAX_BODY = 1024 * 1024
_URL = re.compile(r"https?://\S+")
_WINDOW = 900  # seconds of X's 15-minute rate-limit window
DUPLICATE = "You are not allowed to create a Tweet with duplicate content."


@dataclass(frozen=True, slots=True)
class XPost:
    """A post the stand-in holds."""

    id: str
    #: the text as it was posted
    text: str
    #: epoch seconds
    created_at: float
    reply_to: str | None = None
    quote_of: str | None = None


@dataclass(frozen=True, slots=True)
class XRequest:
    """One request the stand-in answered (or dropped: status 0)."""

    method: str
    path: str
    #: "oauth1", "bearer" or None (no or unknown scheme)
    auth: str | None
    status: int


@dataclass(frozen=True, slots=True)
class _Script:
    action: Literal["rate_limit", "fail", "drop", "stall"]
    status: int = 0
    posted: bool = False
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before answering; None with body None: close without answering
    delay: float = 0.0


def _problem(status: int, title: str, detail: str) -> _Reply:
    return _Reply(
        status, {"title": title, "detail": detail, "type": "about:blank", "status": status}
    )


def _invalid(message: str) -> _Reply:
    return _Reply(
        400,
        {
            "errors": [{"message": message}],
            "title": "Invalid Request",
            "detail": "One or more parameters to your request was invalid.",
            "type": "https://api.twitter.com/2/problems/invalid-request",
        },
    )


def _rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class _Validator(RequestValidator):
    """oauthlib's server-side questions, answered for the one app and user of the stand-in."""

    def __init__(self, api: XApiStandIn) -> None:
        super().__init__()
        self.api = api
        self._nonces: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    @property
    def enforce_ssl(self) -> bool:
        return False  # loopback, plain HTTP

    @property
    def safe_characters(self) -> set[str]:
        # X's access tokens look like "<user id>-<random>": the hyphen must be allowed
        return set(string.ascii_letters + string.digits + "-_")

    @property
    def client_key_length(self) -> tuple[int, int]:
        return (10, 64)

    @property
    def access_token_length(self) -> tuple[int, int]:
        return (10, 100)

    @property
    def nonce_length(self) -> tuple[int, int]:
        return (8, 64)

    @property
    def allowed_signature_methods(self) -> tuple[str, ...]:
        return (SIGNATURE_HMAC_SHA1,)  # the only method X accepts

    @property
    def dummy_client(self) -> str:
        return "dummy-client-key-0000"

    @property
    def dummy_access_token(self) -> str:
        return "dummy-access-token-0000"

    def validate_client_key(self, client_key: str, request: Request) -> bool:
        return hmac.compare_digest(client_key, self.api.consumer_key)

    def validate_access_token(self, client_key: str, token: str, request: Request) -> bool:
        return hmac.compare_digest(token, self.api.access_token)

    def get_client_secret(self, client_key: str, request: Request) -> str:
        if hmac.compare_digest(client_key, self.api.consumer_key):
            return self.api.consumer_secret
        return "dummy-client-secret"

    def get_access_token_secret(self, client_key: str, token: str, request: Request) -> str:
        if hmac.compare_digest(token, self.api.access_token):
            return self.api.access_token_secret
        return "dummy-token-secret"

    def validate_timestamp_and_nonce(
        self,
        client_key: str,
        timestamp: str,
        nonce: str,
        request: Request,
        request_token: str | None = None,
        access_token: str | None = None,
    ) -> bool:
        seen = (client_key, timestamp, nonce)
        with self._lock:
            if seen in self._nonces:
                return False  # a replayed request
            self._nonces.add(seen)
        return True

    def validate_realms(
        self,
        client_key: str,
        token: str,
        request: Request,
        uri: str | None = None,
        realms: list[str] | None = None,
    ) -> bool:
        return True


class XApiStandIn:
    """The X API v2 endpoints ``x.post`` calls, for one user, on loopback.

    Use it as a context manager or call :meth:`start` and :meth:`stop`. Credentials are
    random per instance; :meth:`oauth1_secret` and :meth:`bearer_secret` give the account
    secret in the forms ``x.post`` reads. Query methods are thread-safe and return copies.
    """

    def __init__(
        self, *, username: str = "farmhand_bot", user_id: str = "1790000000000000001"
    ) -> None:
        self.username = username
        self.user_id = user_id
        self.consumer_key = secrets.token_urlsafe(18).replace("_", "a")[:25]
        self.consumer_secret = secrets.token_urlsafe(36)
        self.access_token = f"{user_id}-{secrets.token_hex(15)}"
        self.access_token_secret = secrets.token_urlsafe(33)
        self.bearer_token = secrets.token_urlsafe(48)
        self._endpoint = ResourceEndpoint(_Validator(self))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._posts: list[XPost] = []
        self._requests: list[XRequest] = []
        self._script: deque[_Script] = deque()
        self._ids = itertools.count(int(user_id) + 1_000_000)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.url = ""

    # -- credentials ------------------------------------------------------------------

    def oauth1_secret(self) -> str:
        """The account secret for OAuth 1.0a: a JSON object of the four values."""
        return json.dumps(
            {
                "consumer_key": self.consumer_key,
                "consumer_secret": self.consumer_secret,
                "access_token": self.access_token,
                "access_token_secret": self.access_token_secret,
            }
        )

    def bearer_secret(self) -> str:
        """The account secret for OAuth 2.0: the user access token."""
        return self.bearer_token

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> XApiStandIn:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("XApiStandIn is already started")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="x-api-stand-in",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()

    def __enter__(self) -> XApiStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting and queries ------------------------------------------------------------

    def rate_limit_next(self, count: int = 1, reset_in: float = _WINDOW) -> None:
        """The next ``count`` create calls get ``429`` with ``x-rate-limit-reset`` set
        ``reset_in`` seconds from now (when they arrive) and nothing is posted."""
        with self._lock:
            self._script.extend(_Script("rate_limit", seconds=reset_in) for _ in range(count))

    def fail_next(self, status: int = 503, *, posted: bool = False) -> None:
        """The next create call gets ``status``; with ``posted`` the post is made anyway."""
        with self._lock:
            self._script.append(_Script("fail", status=status, posted=posted))

    def drop_next_response(self) -> None:
        """The next create call makes its post, then the connection closes unanswered."""
        with self._lock:
            self._script.append(_Script("drop", posted=True))

    def stall_next(self, seconds: float) -> None:
        """The next create call makes its post and answers only after ``seconds``."""
        with self._lock:
            self._script.append(_Script("stall", posted=True, seconds=seconds))

    def add_post(
        self,
        text: str,
        created_at: float | None = None,
        *,
        reply_to: str | None = None,
        quote_of: str | None = None,
    ) -> XPost:
        """A post of the user made some other way (another app, by hand)."""
        with self._lock:
            return self._store(text, created_at or time.time(), reply_to, quote_of)

    def posts(self) -> list[XPost]:
        """Every post, oldest first."""
        with self._lock:
            return list(self._posts)

    def requests(self) -> list[XRequest]:
        """Every request, in arrival order."""
        with self._lock:
            return list(self._requests)

    # -- the API ------------------------------------------------------------------------

    def _store(
        self, text: str, created_at: float, reply_to: str | None, quote_of: str | None
    ) -> XPost:
        post = XPost(str(next(self._ids)), text, created_at, reply_to, quote_of)
        self._posts.append(post)
        return post

    def _auth(
        self, method: str, uri: str, authorization: str | None
    ) -> Literal["oauth1", "bearer"] | None:
        """Which scheme authenticated the request, or None when it did not."""
        if authorization is None:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            ok = hmac.compare_digest(value.strip(), self.bearer_token)
            return "bearer" if ok else None
        if scheme.lower() == "oauth":
            valid, _ = self._endpoint.validate_protected_resource_request(
                uri, http_method=method, headers={"Authorization": authorization}
            )
            return "oauth1" if valid else None
        return None

    def _answer(self, method: str, uri: str, authorization: str | None, raw: bytes) -> _Reply:
        auth = self._auth(method, uri, authorization)
        reply = self._route(method, uri, auth, raw)
        with self._lock:
            status = reply.status if reply.body is not None else 0
            self._requests.append(XRequest(method, urlsplit(uri).path, auth, status))
        return reply

    def _route(self, method: str, uri: str, auth: str | None, raw: bytes) -> _Reply:
        parts = urlsplit(uri)
        if auth is None:
            return _problem(401, "Unauthorized", "Unauthorized")
        if method == "POST" and parts.path == "/2/tweets":
            return self._create(raw)
        if method == "GET" and parts.path == "/2/users/me":
            return _Reply(
                200, {"data": {"id": self.user_id, "name": "Farmhand", "username": self.username}}
            )
        timeline = re.fullmatch(r"/2/users/(\d+)/tweets", parts.path)
        if method == "GET" and timeline:
            if timeline.group(1) != self.user_id:
                return _problem(404, "Not Found Error", f"no user {timeline.group(1)}")
            return self._timeline(parse_qs(parts.query))
        return _problem(404, "Not Found", f"no route {method} {parts.path}")

    def _create(self, raw: bytes) -> _Reply:
        try:
            body = json.loads(raw)
        except ValueError:
            return _invalid("request body is not JSON")
        if not isinstance(body, dict) or set(body) - {"text", "reply", "quote_tweet_id"}:
            return _invalid("unknown or malformed fields")
        text = body.get("text")
        reply = body.get("reply")
        reply_to = reply.get("in_reply_to_tweet_id") if isinstance(reply, dict) else None
        quote_of = body.get("quote_tweet_id")
        if not isinstance(text, str) or not text.strip():
            return _invalid("text must be a non-empty string")
        with self._lock:
            script = self._script[0] if self._script else None
            now = time.time()
            if script is not None and script.action == "rate_limit":
                self._script.popleft()
                reset = str(int(now + script.seconds))
                headers = {
                    "x-rate-limit-limit": "100",
                    "x-rate-limit-remaining": "0",
                    "x-rate-limit-reset": reset,
                }
                return _Reply(
                    429, _problem(429, "Too Many Requests", "Too Many Requests").body, headers
                )
            if any(p.text == text for p in self._posts):
                return _problem(403, "Forbidden", DUPLICATE)
            known = {p.id for p in self._posts}
            if reply_to is not None and reply_to not in known:
                return _problem(
                    403,
                    "Forbidden",
                    "You attempted to reply to a Tweet that is deleted or not visible to you.",
                )
            if quote_of is not None and quote_of not in known:
                return _problem(403, "Forbidden", "Quoting this Tweet is not allowed.")
            if script is not None:
                self._script.popleft()  # a scripted outcome is spent only on a valid create
            if script is not None and script.action == "fail" and not script.posted:
                return _problem(script.status, "Service Unavailable", "Service Unavailable")
            post = self._store(text, now, reply_to, quote_of)
        created = _Reply(
            201,
            {"data": {"id": post.id, "text": text, "edit_history_tweet_ids": [post.id]}},
            {"x-rate-limit-limit": "100", "x-rate-limit-remaining": "99"},
        )
        if script is None:
            return created
        if script.action == "fail":
            return _problem(script.status, "Service Unavailable", "Service Unavailable")
        if script.action == "drop":
            return _Reply(0, None)
        return _Reply(created.status, created.body, created.headers, delay=script.seconds)

    def _timeline(self, query: dict[str, list[str]]) -> _Reply:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        try:
            start = _parse_time(one("start_time") or "1970-01-01T00:00:00Z")
            end = _parse_time(one("end_time") or "9999-01-01T00:00:00Z")
            size = int(one("max_results") or "10")
            offset = int(one("pagination_token") or "0")
        except ValueError:
            return _invalid("malformed start_time, end_time, max_results or pagination_token")
        if not 5 <= size <= 100:
            return _invalid("max_results must be between 5 and 100")
        fields = set((one("tweet.fields") or "").split(","))
        with self._lock:
            matching = [p for p in reversed(self._posts) if start <= p.created_at <= end]
        page = matching[offset : offset + size]
        if not page:
            return _Reply(200, {"meta": {"result_count": 0}})
        meta: dict[str, Any] = {
            "result_count": len(page),
            "newest_id": page[0].id,
            "oldest_id": page[-1].id,
        }
        if offset + size < len(matching):
            meta["next_token"] = str(offset + size)
        return _Reply(200, {"data": [_shown(p, fields) for p in page], "meta": meta})


def _shown(post: XPost, fields: set[str]) -> dict[str, Any]:
    """A post as X's timeline shows it: HTML-escaped text, links shortened to t.co."""
    urls: list[dict[str, Any]] = []

    def shorten(match: re.Match[str]) -> str:
        short = f"https://t.co/{secrets.token_urlsafe(8)[:10]}"
        urls.append({"url": short, "expanded_url": match.group(), "display_url": match.group()})
        return short

    text = html.escape(_URL.sub(shorten, post.text), quote=False)
    shown: dict[str, Any] = {"id": post.id, "text": text, "edit_history_tweet_ids": [post.id]}
    if "created_at" in fields:
        shown["created_at"] = _rfc3339(post.created_at)
    if "entities" in fields and urls:
        shown["entities"] = {"urls": urls}
    refs = []
    if post.reply_to is not None:
        refs.append({"type": "replied_to", "id": post.reply_to})
    if post.quote_of is not None:
        refs.append({"type": "quoted", "id": post.quote_of})
    if "referenced_tweets" in fields and refs:
        shown["referenced_tweets"] = refs
    return shown


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], api: XApiStandIn) -> None:
        self.api = api
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "x-api-stand-in"
    timeout = 60.0

    @property
    def api(self) -> XApiStandIn:
        return cast(_Server, self.server).api

    def setup(self) -> None:
        super().setup()
        with self.api._lock:
            self.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.api._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request logging to stderr."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
        uri = f"http://{self.headers.get('Host', '')}{self.path}"
        reply = self.api._answer(self.command, uri, self.headers.get("Authorization"), raw)
        if reply.body is None:
            self.close_connection = True  # the answer is lost on the way back
            return
        if reply.delay and self.api._stopping.wait(reply.delay):
            self.close_connection = True
            return
        body = json.dumps(reply.body).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = _serve
