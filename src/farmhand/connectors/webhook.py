"""``webhook.post``: one HTTP request per attempt, carrying the intent's Idempotency-Key.

2xx is a success whose receipt takes ``id``/``url`` from the JSON response; 408, 429 and
5xx are retryable (Retry-After honoured); other 4xx are permanent. A transport error after
the request may have been sent is *uncertain* unless the account declares that its target
honours Idempotency-Key, in which case sending again is safe.

An account with a secret sends it as ``Authorization: Bearer <secret>`` (replacing any
Authorization header in the payload); the secret is redacted from every error built from the
response, which may echo it, before the error is cut to an excerpt.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farmhand.config import AccountConfig
from farmhand.connectors.base import Call, Connector, Failed, Result, Succeeded, Uncertain
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    import httpx

_RETRYABLE_STATUS = frozenset({408, 425, 429})
# an HTTP field value: visible ASCII, inner spaces allowed, no surrounding whitespace
_HEADER_SAFE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_BODY_EXCERPT = 200
#: how much of an error response is redacted before the excerpt is cut from it
_REDACT_WINDOW = 64 * 1024


class WebhookPayload(BaseModel):
    """The payload of a ``webhook.post`` intent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$")
    method: Literal["POST", "PUT", "PATCH", "DELETE"] = "POST"
    json_body: Any = Field(default=None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # the asctime form carries no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def _redactor(call: Call) -> Callable[[str], str]:
    """Redacts the call's secret from text built from what the target sent back (built on
    first use: successful calls never pay for it)."""
    secret = call.secret
    if secret is None:
        return str
    built: list[Callable[[str], str]] = []

    def redact(text: str) -> str:
        if not built:
            from farmhand.redact import Redactor

            built.append(Redactor([(secret.name, secret.reveal())]).text)
        return built[0](text)

    return redact


class WebhookConnector(Connector):
    """HTTP webhook connector (httpx, pooled connections)."""

    kind: ClassVar[str] = "webhook.post"
    payload_model: ClassVar[type[BaseModel]] = WebhookPayload

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    def validate(self, payload: dict[str, Any], key: str) -> None:
        if not _HEADER_SAFE.match(key):
            raise InvalidInput(
                "webhook.post sends the idempotency key unchanged in the Idempotency-Key header, "
                "so it must be visible ASCII without leading or trailing spaces; choose another key"
            )
        try:
            parsed = WebhookPayload.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise InvalidInput(f"webhook.post payload: {where}: {first['msg']}") from None
        if any(name.lower() == "idempotency-key" for name in parsed.headers):
            raise InvalidInput(
                "webhook.post payload: headers must not set Idempotency-Key; farmhand sends the "
                "intent's key"
            )

    def idempotent(self, account: AccountConfig) -> bool:
        return account.honours_idempotency_key

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx  # imported here: the CLI's submit path never needs it

            self._client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self._client

    async def execute(self, call: Call) -> Result:
        import httpx

        payload = WebhookPayload.model_validate(call.intent.payload)
        if not _HEADER_SAFE.match(call.intent.key):
            return Failed(error="idempotency key cannot be sent as an HTTP header", retryable=False)
        headers = {**payload.headers, "Idempotency-Key": call.intent.key}
        redact = _redactor(call)
        if call.secret is not None:
            # the account's credential replaces any Authorization the payload asked for
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = f"Bearer {call.secret.reveal()}"
        try:
            response = await self._http().request(
                payload.method,
                payload.url,
                json=payload.json_body,
                headers=headers,
                timeout=httpx.Timeout(call.timeout, connect=min(5.0, call.timeout)),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            error = redact(f"cannot connect to {payload.url}: {exc!r}")
            return Failed(error=error, retryable=True)
        except httpx.TransportError as exc:
            error = redact(f"request to {payload.url} may have been sent, then failed: {exc!r}")
            if self.idempotent(call.account):
                return Failed(error=error, retryable=True)
            return Uncertain(error=error)
        return self._result(response, redact)

    @staticmethod
    def _result(response: httpx.Response, redact: Callable[[str], str] = str) -> Result:
        status = response.status_code
        if 200 <= status < 300:
            data: Any = None
            if response.content:
                try:
                    data = response.json()
                except ValueError:
                    data = None
            external_id = url = None
            if isinstance(data, dict):
                if data.get("id") is not None:
                    external_id = str(data["id"])
                if isinstance(data.get("url"), str):
                    url = data["url"]
            return Succeeded(external_id=external_id, url=url, detail={"status": status})
        # redacted before it is cut: a provider may echo the credential, and a cut through
        # it would leave a piece no redactor recognises
        excerpt = redact(response.text[:_REDACT_WINDOW])[:_BODY_EXCERPT]
        error = f"HTTP {status} from {redact(str(response.request.url))}: {excerpt}"
        if status in _RETRYABLE_STATUS or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Failed(error=error, retryable=True, retry_after=retry_after)
        return Failed(error=error, retryable=False)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
