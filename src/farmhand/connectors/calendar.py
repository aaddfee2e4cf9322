"""``calendar.put``: create or update one event in a CalDAV calendar (RFC 4791) over httpx.

The event's resource name and UID come from an idempotency key: ``<sha256(key)[:32]>.ics`` in
the account's calendar collection, UID ``<same digest>@farmhand``. A *create* is a PUT with
``If-None-Match: *``, so a repeated call can never make a second event: the server answers
412, the connector reads the resource back and, when it carries the same UID, reports the
event as already created. An *update* names the key the event was created under
(``event_key``) and the ETag it expects (``if_match``); it is a PUT with ``If-Match``, so it
can never overwrite a change made since. Both preconditions make every call safe to repeat.

Settings, ``[accounts.<name>.connector]``: ``url`` (the calendar collection), ``username``
and ``auth`` (``basic``: username + the account's secret as the password; ``bearer``: the
secret as an OAuth access token; ``none``). The body is built with :mod:`icalendar`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farmhand.config import AccountConfig
from farmhand.connectors.base import (
    Absent,
    Call,
    Connector,
    Failed,
    Reconciled,
    Result,
    Succeeded,
    parse,
    settings_where,
)
from farmhand.connectors.webhook import parse_retry_after
from farmhand.contracts import Attempt
from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    import httpx
    from icalendar import Event

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# an entity tag as sent in If-Match: quoted, optionally weak (RFC 9110 section 8.8.3)
_ETAG = re.compile(r'^(W/)?"[\x21\x23-\x7e\x80-\xff]*"$')
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_BODY_EXCERPT = 200
#: marker property naming the intent that wrote an event, to recognise our own update
MARKER = "X-FARMHAND-INTENT"
PRODID = "-//farmhand//calendar.put//EN"


class CalendarSettings(BaseModel):
    """``[accounts.<name>.connector]`` for ``calendar.put``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the calendar collection, e.g. https://caldav.fastmail.com/dav/calendars/user/me@fastmail.com/Default/
    url: str = Field(pattern=r"^https?://[^\s]+$")
    username: str | None = None
    auth: Literal["basic", "bearer", "none"] = "basic"

    @model_validator(mode="after")
    def _username_for_basic(self) -> CalendarSettings:
        if self.auth == "basic" and not self.username:
            raise ValueError('auth "basic" needs a username (the password is the secret)')
        return self

    @property
    def collection(self) -> str:
        """The collection URL with its trailing slash."""
        return self.url if self.url.endswith("/") else self.url + "/"


class CalendarPayload(BaseModel):
    """The payload of a ``calendar.put`` intent.

    ``start``/``end``: ISO 8601 date-times (with an offset, or local to ``timezone``) or,
    for an all-day event, dates (``end`` exclusive). An update carries both ``event_key``
    (the idempotency key the event was created under) and ``if_match`` (its current ETag,
    from that intent's receipt).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: str = Field(min_length=1, max_length=1000)
    start: datetime | date
    end: datetime | date | None = None
    #: IANA zone (e.g. Europe/Paris) for date-times given without an offset
    timezone: str | None = None
    description: str | None = Field(default=None, max_length=100_000)
    location: str | None = Field(default=None, max_length=1000)
    event_key: str | None = Field(default=None, min_length=1, max_length=255)
    if_match: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _date_only_is_a_date(cls, value: Any) -> Any:
        # pydantic would read "2025-05-01" as midnight; here it means an all-day event
        if isinstance(value, str) and _DATE_ONLY.match(value):
            return date.fromisoformat(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value

    @field_validator("if_match")
    @classmethod
    def _quoted_etag(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not (value.startswith('"') or value.startswith("W/")):
            value = f'"{value}"'  # some clients show ETags without their quotes
        if not _ETAG.match(value):
            raise ValueError(f"not an entity tag: {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CalendarPayload:
        if (self.event_key is None) != (self.if_match is None):
            raise ValueError(
                "an update needs both event_key (the key the event was created under) and "
                "if_match (its ETag); a create has neither"
            )
        all_day = not isinstance(self.start, datetime)
        if self.end is not None:
            if all_day == isinstance(self.end, datetime):
                raise ValueError("start and end must both be dates or both date-times")
            if _aware(self.end, self.timezone) <= _aware(self.start, self.timezone):
                raise ValueError("end must be after start")
        for value in (self.start, self.end):
            if isinstance(value, datetime) and value.tzinfo is None and self.timezone is None:
                raise ValueError(
                    "a date-time needs an offset (e.g. 2025-05-01T10:00:00+02:00) or a timezone"
                )
        return self

    @property
    def is_update(self) -> bool:
        """Whether this intent updates an existing event (If-Match) rather than creating one."""
        return self.if_match is not None


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name)") from None


def _aware(value: date, zone: str | None) -> datetime:
    """A comparable instant for ``value`` (dates become midnight UTC)."""
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=_zone(zone) if zone else UTC)
    return value


def _when(value: date, zone: str | None) -> date:
    """What goes into DTSTART/DTEND: dates as they are; date-times in ``zone`` (a TZID
    with its VTIMEZONE) when one is named, else in UTC (a fixed offset has no TZID)."""
    if not isinstance(value, datetime):
        return value
    if zone is not None:
        tz = _zone(zone)
        return value.replace(tzinfo=tz) if value.tzinfo is None else value.astimezone(tz)
    return value.astimezone(UTC)


def event_name(key: str) -> str:
    """The digest that names the event created under idempotency key ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def event_uid(key: str) -> str:
    """The UID of the event created under ``key``."""
    return f"{event_name(key)}@farmhand"


def event_url(collection: str, key: str) -> str:
    """The resource URL of the event created under ``key`` in ``collection``."""
    base = collection if collection.endswith("/") else collection + "/"
    return f"{base}{event_name(key)}.ics"


def build_event(payload: CalendarPayload, uid: str, intent_id: str, now: datetime) -> bytes:
    """The iCalendar object (one VEVENT) that ``payload`` describes."""
    from icalendar import Calendar, Event

    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    event = Event()
    event.add("uid", uid)
    event.add("dtstamp", now.astimezone(UTC))
    event.add("summary", payload.summary)
    event.add("dtstart", _when(payload.start, payload.timezone))
    if payload.end is not None:
        event.add("dtend", _when(payload.end, payload.timezone))
    if payload.description is not None:
        event.add("description", payload.description)
    if payload.location is not None:
        event.add("location", payload.location)
    event.add(MARKER, intent_id)
    calendar.add_component(event)
    if payload.timezone is not None:
        calendar.add_missing_timezones()
    body: bytes = calendar.to_ical()
    return body


@dataclass(frozen=True, slots=True)
class _Found:
    """What a GET of an event resource found."""

    status: int
    etag: str | None = None
    event: Event | None = None
    #: why the resource could not be read as an event (status 200 only)
    unreadable: str | None = None

    @property
    def uid(self) -> str | None:
        if self.event is None:
            return None
        value = self.event.get("uid")
        return None if value is None else str(value)


def _same_content(found: Event, wanted: Event) -> bool:
    """Whether ``found`` shows what ``wanted`` describes (for servers that drop X- props)."""
    for name in ("summary", "description", "location"):
        if str(found.get(name, "")) != str(wanted.get(name, "")):
            return False
    for name in ("dtstart", "dtend"):
        has, wants = name in found, name in wanted
        if has != wants or (has and found.decoded(name) != wanted.decoded(name)):
            return False
    return True


def _shows_update(found: Event, payload: CalendarPayload, uid: str, intent_id: str) -> bool:
    """Whether ``found`` is what this update intent wrote: its marker names the intent or,
    on a server that drops X- properties, it shows the same content."""
    marker = found.get(MARKER)
    if marker is not None:
        return str(marker) == intent_id
    wanted = _parse_event(build_event(payload, uid, intent_id, datetime.now(UTC)))
    return _same_content(found, wanted)


def _parse_event(body: bytes) -> Event:
    from icalendar import Calendar, Event

    for component in Calendar.from_ical(body).walk("VEVENT"):
        if isinstance(component, Event):
            return component
    raise ValueError("no VEVENT in the resource")


def _redactor(call: Call) -> Callable[[str], str]:
    secret = call.secret
    if secret is None:
        return str
    from farmhand.redact import Redactor

    return Redactor([(secret.name, secret.reveal())]).text


class CalendarConnector(Connector):
    """CalDAV connector: create-if-absent and update-if-unchanged of one event per intent."""

    kind: ClassVar[str] = "calendar.put"
    payload_model: ClassVar[type[BaseModel]] = CalendarPayload

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    # -- validation -------------------------------------------------------------------

    def validate(self, payload: dict[str, Any], key: str) -> None:
        parse(CalendarPayload, payload, "calendar.put payload")

    def validate_for(self, payload: dict[str, Any], account: AccountConfig) -> None:
        """Check the account's ``[accounts.<name>.connector]`` settings."""
        settings = self.settings(account)
        if settings.auth != "none" and account.secret is None:
            raise InvalidInput(
                f"account {account.name!r}: calendar.put with auth {settings.auth!r} needs the "
                "account to name a secret (the password or token)"
            )

    @staticmethod
    def settings(account: AccountConfig) -> CalendarSettings:
        """The account's validated connector settings (raises InvalidInput)."""
        where = settings_where(account, "calendar.put")
        return parse(CalendarSettings, account.connector, f"account {account.name!r}: {where}")

    def idempotent(self, account: AccountConfig) -> bool:
        # If-None-Match: * and If-Match make every repeat harmless
        return True

    # -- HTTP -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    @staticmethod
    def _auth(settings: CalendarSettings, call: Call) -> tuple[Any, dict[str, str]]:
        import httpx

        if settings.auth == "none":
            return None, {}
        if call.secret is None:
            raise InvalidInput(f"account {call.account.name!r} has no secret for calendar.put")
        if settings.auth == "bearer":
            return None, {"Authorization": f"Bearer {call.secret.reveal()}"}
        return httpx.BasicAuth(settings.username or "", call.secret.reveal()), {}

    async def _get(
        self, url: str, settings: CalendarSettings, call: Call, timeout: float
    ) -> _Found:
        """GET one event resource (raises httpx.TransportError)."""
        auth, headers = self._auth(settings, call)
        response = await self._http().get(
            url, auth=auth, headers={**headers, "Accept": "text/calendar"}, timeout=timeout
        )
        etag = response.headers.get("ETag")
        if response.status_code != 200:
            return _Found(response.status_code, etag)
        try:
            return _Found(200, etag, _parse_event(response.content))
        except ValueError as exc:
            return _Found(200, etag, unreadable=str(exc))

    # -- execute ----------------------------------------------------------------------

    async def execute(self, call: Call) -> Result:
        import httpx

        try:
            settings = self.settings(call.account)
            payload = CalendarPayload.model_validate(call.intent.payload)
            auth, headers = self._auth(settings, call)
        except (InvalidInput, ValidationError) as exc:
            return Failed(error=str(exc), retryable=False)
        key = payload.event_key or call.intent.key
        url = event_url(settings.collection, key)
        uid = event_uid(key)
        body = build_event(payload, uid, call.intent.id, datetime.now(UTC))
        headers["Content-Type"] = "text/calendar; charset=utf-8"
        if payload.if_match is not None:
            headers["If-Match"] = payload.if_match
        else:
            headers["If-None-Match"] = "*"
        redact = _redactor(call)
        timeout = httpx.Timeout(call.timeout, connect=min(5.0, call.timeout))
        try:
            response = await self._http().put(
                url, content=body, headers=headers, auth=auth, timeout=timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return Failed(error=redact(f"cannot connect to {url}: {exc!r}"), retryable=True)
        except httpx.TransportError as exc:
            guard = "If-Match" if payload.is_update else "If-None-Match"
            error = f"PUT {url} may have been sent, then failed ({exc!r}); resending is safe"
            error += f" ({guard})"
            return Failed(error=redact(error), retryable=True)
        status = response.status_code
        action = "updated" if payload.is_update else "created"
        if 200 <= status < 300:
            etag = response.headers.get("ETag")
            if etag is None:
                # a server that changed what it stored sends no ETag (RFC 4791 5.3.4)
                try:
                    etag = (await self._get(url, settings, call, call.timeout)).etag
                except httpx.TransportError:
                    etag = None
            return _succeeded(uid, url, etag, status, action)
        if status == 412:
            return await self._precondition_failed(call, payload, settings, url, uid, redact)
        excerpt = redact(response.text[: 64 * 1024])[:_BODY_EXCERPT]
        error = f"HTTP {status} from PUT {url}: {excerpt}"
        if status in (401, 403):
            return Failed(
                error=f"{error} (check the account's username and secret)", retryable=False
            )
        if status == 404:
            what = "the event" if payload.is_update else "the calendar collection"
            return Failed(error=f"{error} ({what} does not exist)", retryable=False)
        if status in _RETRYABLE_STATUS or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Failed(error=error, retryable=True, retry_after=retry_after)
        return Failed(error=error, retryable=False)

    async def _precondition_failed(
        self,
        call: Call,
        payload: CalendarPayload,
        settings: CalendarSettings,
        url: str,
        uid: str,
        redact: Callable[[str], str],
    ) -> Result:
        """412: read the event back to tell a repeat of our own call from a conflict."""
        import httpx

        try:
            found = await self._get(url, settings, call, call.timeout)
        except httpx.TransportError as exc:
            error = f"HTTP 412 from PUT {url}, then reading it back failed: {exc!r}"
            return Failed(error=redact(error), retryable=True)
        if found.status == 404 and payload.is_update:
            return Failed(
                error=(
                    f"no event at {url} to update: it was deleted, or never created under "
                    f"event_key {payload.event_key!r}"
                ),
                retryable=False,
            )
        if found.status == 404:
            # deleted between our PUT and GET: the next attempt decides again
            return Failed(error=f"HTTP 412 from PUT {url}, then 404 on GET", retryable=True)
        if found.event is None:
            why = found.unreadable or f"HTTP {found.status}"
            return Failed(error=f"HTTP 412 from PUT {url}; reading it back: {why}", retryable=True)
        if not payload.is_update:
            if found.uid == uid:
                return _succeeded(uid, url, found.etag, 412, "already created")
            return Failed(
                error=f"another event (UID {found.uid}) already exists at {url}", retryable=False
            )
        if _shows_update(found.event, payload, uid, call.intent.id):
            return _succeeded(uid, url, found.etag, 412, "already updated")
        return Failed(
            error=(
                f"conflict: the event changed since ETag {payload.if_match} (now {found.etag}); "
                "read it again and submit an update with its current ETag"
            ),
            retryable=False,
        )

    # -- reconcile --------------------------------------------------------------------

    async def reconcile(self, call: Call, attempt: Attempt) -> Reconciled:
        import httpx

        try:
            settings = self.settings(call.account)
            payload = CalendarPayload.model_validate(call.intent.payload)
        except (InvalidInput, ValidationError) as exc:
            return Absent(f"cannot look the event up ({exc}); resending is safe")
        key = payload.event_key or call.intent.key
        url = event_url(settings.collection, key)
        uid = event_uid(key)
        guard = "If-Match" if payload.is_update else "If-None-Match"
        try:
            found = await self._get(url, settings, call, call.timeout)
        except (httpx.TransportError, InvalidInput) as exc:
            return Absent(
                _redactor(call)(f"looking up {url} failed ({exc!r}); resending is safe ({guard})")
            )
        if found.status == 404:
            return Absent(f"no event at {url}; resending is safe ({guard})")
        if found.event is None:
            why = found.unreadable or f"HTTP {found.status}"
            return Absent(f"looking up {url}: {why}; resending is safe ({guard})")
        if not payload.is_update:
            if found.uid == uid:
                return _succeeded(uid, url, found.etag, found.status, "found by reconcile")
            return Absent(f"another event (UID {found.uid}) is at {url}; resending reports it")
        if _shows_update(found.event, payload, uid, call.intent.id):
            return _succeeded(uid, url, found.etag, found.status, "found by reconcile")
        return Absent(f"the event at {url} does not show this update; resending is safe ({guard})")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _succeeded(uid: str, url: str, etag: str | None, status: int, action: str) -> Succeeded:
    return Succeeded(
        external_id=uid,
        url=url,
        detail={"etag": etag, "uid": uid, "status": status, "action": action},
    )


__all__ = [
    "CalendarConnector",
    "CalendarPayload",
    "CalendarSettings",
    "build_event",
    "event_name",
    "event_uid",
    "event_url",
]
