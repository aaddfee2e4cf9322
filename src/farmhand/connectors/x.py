"""``x.post``: create one post through the X API v2 (``POST /2/tweets``) over httpx.

X has no idempotency key, so a call that may have reached the API is never repeated blindly.
When the answer is lost (a 5xx, a timeout, a dropped connection) the connector looks for the
post on the account's timeline (``GET /2/users/:id/tweets`` since the attempt started) and
reports it as done only when it finds the exact text; otherwise the outcome is *uncertain*
and a human decides. Only a refused connection proves the API was never reached.

Credentials come from the account's secret, in one of two forms:

* OAuth 1.0a user context, a JSON object ``{"consumer_key": ..., "consumer_secret": ...,
  "access_token": ..., "access_token_secret": ...}``; requests are signed with
  :mod:`oauthlib` (HMAC-SHA1, as X requires);
* an OAuth 2.0 user access token, as the bare token or ``{"bearer_token": ...}``.

Settings, ``[accounts.<name>.connector]``: ``api_base`` (default ``https://api.x.com``),
``username`` (for post URLs) and ``user_id`` (for timeline look-ups; found with
``GET /2/users/me`` when not given).
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farmhand.config import AccountConfig
from farmhand.connectors.base import (
    Call,
    Connector,
    Failed,
    Reconciled,
    Result,
    Succeeded,
    Uncertain,
    parse,
    settings_where,
)
from farmhand.connectors.webhook import parse_retry_after
from farmhand.contracts import Attempt
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    import httpx

DEFAULT_API_BASE = "https://api.x.com"
#: how far before the attempt started a timeline look-up reaches (clock skew between this
#: host and X, and the time X takes to stamp a post)
LOOKUP_MARGIN = 60.0
#: timeline pages read at most per look-up (100 posts each)
LOOKUP_PAGES = 5
#: share of the call's time the POST may use; the rest is kept for a look-up after it
POST_SHARE = 2 / 3
#: rate-limit header families, each with ``-remaining`` and ``-reset`` (epoch seconds)
_LIMIT_HEADERS = ("x-rate-limit", "x-user-limit-24hour", "x-app-limit-24hour")
_OAUTH1_FIELDS = ("consumer_key", "consumer_secret", "access_token", "access_token_secret")
_LEADING_MENTIONS = re.compile(r"^(?:@\w{1,15}\s+)+")
_BODY_EXCERPT = 200
_ID = r"^\d{1,19}$"


class XReply(BaseModel):
    """``reply`` of an ``x.post`` payload, as in the X API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_reply_to_tweet_id: str = Field(pattern=_ID)


class XPayload(BaseModel):
    """The payload of an ``x.post`` intent: the body of ``POST /2/tweets``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=25_000)
    reply: XReply | None = None
    quote_tweet_id: str | None = Field(default=None, pattern=_ID)


class XSettings(BaseModel):
    """``[accounts.<name>.connector]`` for ``x.post``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_base: str = Field(default=DEFAULT_API_BASE, pattern=r"^https?://[^\s/]+(?:/[^\s]*)?$")
    username: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,15}$")
    user_id: str | None = Field(default=None, pattern=_ID)

    @property
    def base(self) -> str:
        """``api_base`` without a trailing slash."""
        return self.api_base.rstrip("/")


@dataclass(frozen=True, slots=True)
class OAuth1Credentials:
    """OAuth 1.0a user-context credentials (never printed: repr hides the values)."""

    consumer_key: str
    consumer_secret: str
    access_token: str
    access_token_secret: str

    def __repr__(self) -> str:
        return "OAuth1Credentials(...)"


@dataclass(frozen=True, slots=True)
class BearerToken:
    """An OAuth 2.0 user access token (never printed: repr hides the value)."""

    token: str

    def __repr__(self) -> str:
        return "BearerToken(...)"


Credentials = OAuth1Credentials | BearerToken


def parse_credentials(value: str) -> Credentials:
    """The credentials in an account's secret (raises InvalidInput naming what is wrong,
    never the values)."""
    text = value.strip()
    if not text.startswith("{"):
        if not text or any(c.isspace() for c in text):
            raise InvalidInput("x.post secret: a bearer token must be one word")
        return BearerToken(text)
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidInput("x.post secret: starts with { but is not a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidInput("x.post secret: expected a JSON object")
    if set(data) == {"bearer_token"} and isinstance(data["bearer_token"], str):
        return parse_credentials(data["bearer_token"])
    missing = [f for f in _OAUTH1_FIELDS if not isinstance(data.get(f), str) or not data[f]]
    unknown = sorted(set(data) - set(_OAUTH1_FIELDS))
    if missing or unknown:
        wanted = ", ".join(_OAUTH1_FIELDS)
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise InvalidInput(
            f"x.post secret: {problem}; expected {{{wanted}}} (OAuth 1.0a) or {{bearer_token}}"
        )
    return OAuth1Credentials(*(str(data[f]) for f in _OAUTH1_FIELDS))


def rate_limit_wait(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds until X lets this account post again, from a 429's headers: the latest
    ``*-reset`` of an exhausted limit (15-minute window, 24-hour user or app limit), else
    ``x-rate-limit-reset``, else Retry-After."""
    now = time.time() if now is None else now
    exhausted = []
    for family in _LIMIT_HEADERS:
        reset = headers.get(f"{family}-reset", "").strip()
        remaining = headers.get(f"{family}-remaining")
        if reset.isascii() and reset.isdigit() and (remaining is None or remaining.strip() == "0"):
            exhausted.append(float(reset))
    if not exhausted:
        reset = headers.get("x-rate-limit-reset", "").strip()
        if reset.isascii() and reset.isdigit():
            exhausted.append(float(reset))
    if exhausted:
        return max(0.0, max(exhausted) - now)
    return parse_retry_after(headers.get("Retry-After"), now)


def post_url(post_id: str, username: str | None) -> str:
    """The public URL of a post."""
    if username:
        return f"https://x.com/{username}/status/{post_id}"
    return f"https://x.com/i/web/status/{post_id}"


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown_texts(post: dict[str, Any], replying: bool) -> set[str]:
    """The texts ``post`` may have been written as: X returns HTML-escaped text with links
    shortened (t.co), and puts the handles of a reply's thread in front."""
    text = html.unescape(str(post.get("text", "")))
    forms = {text}
    entities = post.get("entities")
    urls = entities.get("urls") if isinstance(entities, dict) else None
    if isinstance(urls, list):
        expanded = text
        for entity in urls:
            if isinstance(entity, dict) and entity.get("url") and entity.get("expanded_url"):
                expanded = expanded.replace(str(entity["url"]), str(entity["expanded_url"]))
        forms.add(expanded)
    if replying:
        forms |= {_LEADING_MENTIONS.sub("", f, count=1) for f in forms}
    return {f.strip() for f in forms}


def _references(post: dict[str, Any]) -> set[tuple[str, str]]:
    refs = post.get("referenced_tweets")
    if not isinstance(refs, list):
        return set()
    return {(str(r.get("type")), str(r.get("id"))) for r in refs if isinstance(r, dict)}


def is_same_post(post: dict[str, Any], payload: XPayload) -> bool:
    """Whether timeline entry ``post`` is what ``payload`` asked X to create."""
    if payload.text.strip() not in _shown_texts(post, payload.reply is not None):
        return False
    refs = _references(post)
    if payload.reply is not None and ("replied_to", payload.reply.in_reply_to_tweet_id) not in refs:
        return False
    return payload.quote_tweet_id is None or ("quoted", payload.quote_tweet_id) in refs


@dataclass(frozen=True, slots=True)
class _Post:
    """One call's validated inputs."""

    call: Call
    settings: XSettings
    credentials: Credentials
    payload: XPayload


class _LookupFailed(Exception):
    """The timeline could not be read (the message says why, without secrets)."""


class XConnector(Connector):
    """X API v2 posts; not idempotent, reconciled by reading the account's timeline."""

    kind: ClassVar[str] = "x.post"
    payload_model: ClassVar[type[BaseModel]] = XPayload

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        #: (api_base, account) -> (user id, username) from GET /2/users/me
        self._me: dict[tuple[str, str], tuple[str, str | None]] = {}

    # -- validation -------------------------------------------------------------------

    def validate(self, payload: dict[str, Any], key: str) -> None:
        parse(XPayload, payload, "x.post payload")

    def validate_for(self, payload: dict[str, Any], account: AccountConfig) -> None:
        """Check the account's ``[accounts.<name>.connector]`` settings and secret name."""
        self.settings(account)
        if account.secret is None:
            raise InvalidInput(
                f"account {account.name!r}: x.post needs the account to name a secret holding "
                "its OAuth 1.0a credentials (JSON) or an OAuth 2.0 user access token"
            )

    @staticmethod
    def settings(account: AccountConfig) -> XSettings:
        """The account's validated connector settings (raises InvalidInput)."""
        where = settings_where(account, "x.post")
        return parse(XSettings, account.connector, f"account {account.name!r}: {where}")

    def idempotent(self, account: AccountConfig) -> bool:
        return False

    # -- HTTP -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    async def _request(
        self,
        method: Literal["GET", "POST"],
        url: str,
        credentials: Credentials,
        timeout: httpx.Timeout | float,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """One signed request; ``url`` carries its query string, which the signature covers."""
        headers = {"User-Agent": "farmhand", "Accept": "application/json"}
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if isinstance(credentials, OAuth1Credentials):
            from oauthlib.oauth1 import SIGNATURE_HMAC_SHA1, Client

            signer = Client(
                credentials.consumer_key,
                client_secret=credentials.consumer_secret,
                resource_owner_key=credentials.access_token,
                resource_owner_secret=credentials.access_token_secret,
                signature_method=SIGNATURE_HMAC_SHA1,
            )
            # a JSON body is not part of an OAuth 1.0a signature (only form bodies are)
            _, signed, _ = signer.sign(url, http_method=method)
            headers["Authorization"] = signed["Authorization"]
        else:
            headers["Authorization"] = f"Bearer {credentials.token}"
        return await self._http().request(
            method, url, content=content, headers=headers, timeout=timeout
        )

    # -- execute ----------------------------------------------------------------------

    async def execute(self, call: Call) -> Result:
        import httpx

        try:
            settings = self.settings(call.account)
            credentials = self._credentials(call)
            payload = XPayload.model_validate(call.intent.payload)
        except (InvalidInput, ValidationError) as exc:
            return Failed(error=str(exc), retryable=False)
        post = _Post(call, settings, credentials, payload)
        redact = _redactor(call, credentials)
        deadline = time.monotonic() + call.timeout
        sent_at = time.time()
        url = f"{settings.base}/2/tweets"
        post_timeout = call.timeout * POST_SHARE
        try:
            response = await self._request(
                "POST",
                url,
                credentials,
                httpx.Timeout(post_timeout, connect=min(5.0, post_timeout)),
                payload.model_dump(exclude_none=True),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # no connection, so no request: provably never reached X
            return Failed(error=redact(f"cannot connect to {url}: {exc!r}"), retryable=True)
        except httpx.TransportError as exc:
            why = f"POST {url} may have reached X, then failed: {exc!r}"
            return await self._find_after(post, sent_at, deadline, redact(why))
        status = response.status_code
        if 200 <= status < 300:
            post_id = _post_id(response)
            if post_id is not None:
                username = settings.username or self._known_username(call, settings)
                return Succeeded(
                    external_id=post_id,
                    url=post_url(post_id, username),
                    detail={"status": status},
                )
            why = f"HTTP {status} from POST {url} without a post id"
            return await self._find_after(post, sent_at, deadline, why)
        excerpt = redact(response.text[: 64 * 1024])[:_BODY_EXCERPT]
        error = f"HTTP {status} from POST {url}: {excerpt}"
        if status == 429:
            wait = rate_limit_wait(response.headers)
            return Failed(error=error, retryable=True, retry_after=wait)
        if status == 403 and "duplicate content" in response.text.lower():
            # the text is already on X: ours from an earlier attempt, or someone else's
            since = call.intent.created_at.timestamp()
            why = "X refused the text as a duplicate of an earlier post (HTTP 403)"
            return await self._find_after(post, since, deadline, why)
        if status >= 500:
            return await self._find_after(post, sent_at, deadline, error)
        if status == 401:
            return Failed(error=f"{error} (check the account's credentials)", retryable=False)
        return Failed(error=error, retryable=False)

    async def _find_after(self, post: _Post, since: float, deadline: float, why: str) -> Result:
        """The post if the timeline shows it was made, else Uncertain (never a retry)."""
        left = deadline - time.monotonic() - 0.05
        if left < 0.2:
            return Uncertain(error=f"{why}; no time left to look for the post on X")
        try:
            found = await self._lookup(post, since, left)
        except _LookupFailed as exc:
            return Uncertain(error=f"{why}; looking for the post failed: {exc}")
        if found is not None:
            return Succeeded(
                external_id=found.external_id,
                url=found.url,
                detail={**found.detail, "after": why},
            )
        return Uncertain(
            error=(
                f"{why}; no post with this text since {_rfc3339(since - LOOKUP_MARGIN)} on the "
                "account's timeline. X has no idempotency key, so farmhand will not post again: "
                "check the account, then run farmhand resolve"
            )
        )

    # -- reconcile --------------------------------------------------------------------

    async def reconcile(self, call: Call, attempt: Attempt) -> Reconciled:
        interrupted = f"attempt {attempt.attempt} by {attempt.executor} was interrupted mid-call"
        try:
            settings = self.settings(call.account)
            credentials = self._credentials(call)
            payload = XPayload.model_validate(call.intent.payload)
        except (InvalidInput, ValidationError) as exc:
            return Uncertain(error=f"{interrupted} and cannot be looked up: {exc}")
        since = attempt.started_at.timestamp()
        post = _Post(call, settings, credentials, payload)
        try:
            found = await self._lookup(post, since, call.timeout)
        except _LookupFailed as exc:
            return Uncertain(
                error=f"{interrupted}; looking for the post on X failed: {exc}; check the "
                "account, then run farmhand resolve"
            )
        if found is not None:
            return found
        # the attempt record cannot show that the request never left this host, so a post
        # that is not (yet) on the timeline is not proof of absence
        return Uncertain(
            error=(
                f"{interrupted}; no post with this text since {_rfc3339(since - LOOKUP_MARGIN)} "
                "on the account's timeline. X has no idempotency key, so farmhand will not post "
                "again: check the account, then run farmhand resolve"
            )
        )

    # -- look-ups ---------------------------------------------------------------------

    def _credentials(self, call: Call) -> Credentials:
        if call.secret is None:
            raise InvalidInput(f"account {call.account.name!r} has no secret for x.post")
        return parse_credentials(call.secret.reveal())

    async def _who(self, post: _Post, timeout: float) -> tuple[str, str | None]:
        """(user id, username) of the account, from settings or ``GET /2/users/me``."""
        call, settings = post.call, post.settings
        if settings.user_id is not None:
            return settings.user_id, settings.username
        cached = self._me.get((settings.base, call.account.name))
        if cached is not None:
            return cached
        import httpx

        url = f"{settings.base}/2/users/me"
        try:
            response = await self._request("GET", url, post.credentials, timeout)
        except httpx.TransportError as exc:
            raise _LookupFailed(f"GET {url}: {type(exc).__name__}") from None
        data = _data(response)
        if response.status_code != 200 or not isinstance(data, dict) or "id" not in data:
            raise _LookupFailed(f"GET {url}: HTTP {response.status_code}")
        username = data.get("username")
        who = (str(data["id"]), str(username) if username else settings.username)
        self._me[(settings.base, call.account.name)] = who
        return who

    def _known_username(self, call: Call, settings: XSettings) -> str | None:
        """The username for a post's URL, if an earlier look-up found it (no request here)."""
        cached = self._me.get((settings.base, call.account.name))
        return cached[1] if cached else None

    async def _lookup(self, post: _Post, since: float, timeout: float) -> Succeeded | None:
        """The account's post with ``payload``'s text made since ``since`` (minus the
        margin), read from ``GET /2/users/:id/tweets``; None if it is not there."""
        from urllib.parse import urlencode

        import httpx

        user_id, username = await self._who(post, timeout)
        params = {
            "start_time": _rfc3339(since - LOOKUP_MARGIN),
            "max_results": "100",
            "tweet.fields": "created_at,referenced_tweets,entities",
        }
        base = f"{post.settings.base}/2/users/{user_id}/tweets"
        for _ in range(LOOKUP_PAGES):
            url = f"{base}?{urlencode(params)}"
            try:
                response = await self._request("GET", url, post.credentials, timeout)
            except httpx.TransportError as exc:
                raise _LookupFailed(f"GET {base}: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise _LookupFailed(f"GET {base}: HTTP {response.status_code}")
            try:
                document = response.json()
            except ValueError:
                raise _LookupFailed(f"GET {base}: not JSON") from None
            posts = document.get("data") if isinstance(document, dict) else None
            for entry in posts if isinstance(posts, list) else []:
                if (
                    isinstance(entry, dict)
                    and entry.get("id")
                    and is_same_post(entry, post.payload)
                ):
                    post_id = str(entry["id"])
                    return Succeeded(
                        external_id=post_id,
                        url=post_url(post_id, username),
                        detail={"found_on_timeline": True, "created_at": entry.get("created_at")},
                    )
            meta = document.get("meta") if isinstance(document, dict) else None
            token = meta.get("next_token") if isinstance(meta, dict) else None
            if not token:
                return None
            params["pagination_token"] = str(token)
        return None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _data(response: httpx.Response) -> Any:
    try:
        document = response.json()
    except ValueError:
        return None
    return document.get("data") if isinstance(document, dict) else None


def _post_id(response: httpx.Response) -> str | None:
    data = _data(response)
    if isinstance(data, dict) and data.get("id") is not None:
        return str(data["id"])
    return None


def _redactor(call: Call, credentials: Credentials) -> Callable[[str], str]:
    """Redacts the secret and each credential inside it (X may echo one part alone)."""
    from farmhand.redact import Redactor

    if call.secret is None:
        return str
    name = call.secret.name
    values = [(name, call.secret.reveal())]
    if isinstance(credentials, OAuth1Credentials):
        values += [(f"{name}.{f}", getattr(credentials, f)) for f in _OAUTH1_FIELDS]
    else:
        values.append((name, credentials.token))
    return Redactor(values).text


__all__ = [
    "BearerToken",
    "Credentials",
    "OAuth1Credentials",
    "XConnector",
    "XPayload",
    "XReply",
    "XSettings",
    "is_same_post",
    "parse_credentials",
    "post_url",
    "rate_limit_wait",
]
