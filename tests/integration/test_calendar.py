"""``calendar.put`` against a real CalDAV server (Radicale on loopback, htpasswd auth):
create-if-absent, retries that make nothing new, updates bound to an ETag, reconcile."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from icalendar import Calendar

from backends import server_missing
from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, Settings
from farmhand.connectors.base import Absent, Call, Failed, Succeeded
from farmhand.connectors.calendar import CalendarConnector, event_uid, event_url
from farmhand.contracts import Attempt, Intent, IntentState, Outcome
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput
from farmhand.executor import Executor
from farmhand.secrets import Secret, SecretStore
from farmhand.store import Store
from farmhand.testing.radicale import LocalRadicale
from farmhand.testing.servers import ServerUnavailable, free_port
from homes import prepare_home

USER = "alice"
PASSWORD = "correct horse battery staple"
SECRET = "CALDAV_PASSWORD"
MEETING: dict[str, Any] = {
    "summary": "Planning",
    "start": "2030-05-01T10:00:00+02:00",
    "end": "2030-05-01T11:00:00+02:00",
    "location": "Room 4",
}
_CALENDARS = iter(range(1, 10_000))


@pytest.fixture(scope="module")
def radicale() -> Iterator[LocalRadicale]:
    try:
        server = LocalRadicale({USER: PASSWORD}).start()
    except ServerUnavailable as exc:
        server_missing("Radicale", exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def collection(radicale: LocalRadicale) -> str:
    """A fresh, empty calendar for one test."""
    return radicale.make_calendar(USER, f"cal{next(_CALENDARS)}")


@pytest.fixture
async def connector() -> AsyncIterator[CalendarConnector]:
    calendar = CalendarConnector()
    yield calendar
    await calendar.aclose()


def account(collection: str, **settings: Any) -> AccountConfig:
    return AccountConfig(
        name="team",
        secret=SECRET,
        connector={"url": collection, "username": USER, **settings},
    )


def build(payload: dict[str, Any], key: str) -> Intent:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]  # build_intent needs no store
    return coordinator.build_intent(SubmitRequest(kind="calendar.put", key=key, payload=payload))


def make_call(
    collection: str,
    payload: dict[str, Any] | None = None,
    key: str = "planning-2030-05-01",
    *,
    attempt: int = 1,
    password: str = PASSWORD,
) -> Call:
    return Call(
        intent=build(MEETING if payload is None else payload, key),
        attempt=attempt,
        account=account(collection),
        timeout=10.0,
        secret=Secret(SECRET, password),
    )


def started(call: Call) -> Attempt:
    return Attempt(
        intent_id=call.intent.id,
        attempt=call.attempt,
        executor="ex_gone",
        fencing_token=1,
        started_at=datetime.now().astimezone(),
    )


@dataclass(frozen=True)
class StoredEvent:
    href: str
    etag: str
    uid: str
    summary: str
    ical: str


_REPORT = """<?xml version="1.0" encoding="utf-8"?>
<c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">
  <d:prop><d:getetag/><c:calendar-data/></d:prop>
  <c:filter><c:comp-filter name="VCALENDAR"><c:comp-filter name="VEVENT"/></c:comp-filter>
  </c:filter>
</c:calendar-query>"""
_NS = {"d": "DAV:", "c": "urn:ietf:params:xml:ns:caldav"}


async def events(collection: str) -> list[StoredEvent]:
    """Every event in the collection, as the server lists it (a CalDAV REPORT)."""
    async with httpx.AsyncClient(auth=(USER, PASSWORD)) as client:
        response = await client.request(
            "REPORT",
            collection,
            content=_REPORT,
            headers={"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
        )
    assert response.status_code == 207, response.text
    found = []
    for item in ET.fromstring(response.content).findall("d:response", _NS):
        href = item.findtext("d:href", namespaces=_NS) or ""
        prop = item.find("d:propstat/d:prop", _NS)
        assert prop is not None
        ical = prop.findtext("c:calendar-data", namespaces=_NS) or ""
        (event,) = Calendar.from_ical(ical).walk("VEVENT")
        etag = prop.findtext("d:getetag", namespaces=_NS) or ""
        found.append(StoredEvent(href, etag, str(event["uid"]), str(event["summary"]), ical))
    return found


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(auth=(USER, PASSWORD)) as client:
        return await client.get(url)


# -- create -------------------------------------------------------------------------------------


async def test_create_puts_one_event_on_the_server(
    collection: str, connector: CalendarConnector
) -> None:
    call = make_call(collection)
    result = await connector.execute(call)
    assert isinstance(result, Succeeded), result
    url = event_url(collection, "planning-2030-05-01")
    uid = event_uid("planning-2030-05-01")
    assert result.url == url
    assert result.external_id == uid
    assert uid.endswith("@farmhand")
    assert result.detail["action"] == "created"

    (stored,) = await events(collection)
    assert stored.uid == uid
    assert stored.summary == "Planning"
    assert url.endswith(stored.href)
    assert stored.etag == result.detail["etag"]
    response = await get(url)
    assert response.status_code == 200
    assert response.headers["ETag"] == result.detail["etag"]
    (event,) = Calendar.from_ical(response.content).walk("VEVENT")
    assert event.decoded("dtstart") == datetime.fromisoformat("2030-05-01T10:00:00+02:00")
    assert event.decoded("dtend") == datetime.fromisoformat("2030-05-01T11:00:00+02:00")
    assert str(event["location"]) == "Room 4"
    assert str(event["x-farmhand-intent"]) == call.intent.id


async def test_a_retry_of_the_same_intent_creates_nothing_new(
    collection: str, connector: CalendarConnector
) -> None:
    call = make_call(collection)
    first = await connector.execute(call)
    again = await connector.execute(dataclasses.replace(call, attempt=2))
    assert isinstance(first, Succeeded)
    assert isinstance(again, Succeeded), again
    assert again.detail["action"] == "already created"
    assert (again.external_id, again.url) == (first.external_id, first.url)
    assert again.detail["etag"] == first.detail["etag"]
    assert len(await events(collection)) == 1


async def test_different_keys_make_different_events(
    collection: str, connector: CalendarConnector
) -> None:
    for key in ("standup-mon", "standup-tue", "standup-mon"):
        result = await connector.execute(make_call(collection, {**MEETING, "summary": key}, key))
        assert isinstance(result, Succeeded)
    stored = await events(collection)
    assert sorted(e.summary for e in stored) == ["standup-mon", "standup-tue"]
    assert {e.uid for e in stored} == {event_uid("standup-mon"), event_uid("standup-tue")}


async def test_a_foreign_event_at_the_name_is_a_permanent_failure(
    collection: str, connector: CalendarConnector
) -> None:
    url = event_url(collection, "planning-2030-05-01")
    foreign = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//other//EN\r\nBEGIN:VEVENT\r\n"
        "UID:someone-else@example.org\r\nDTSTAMP:20300101T000000Z\r\n"
        "DTSTART:20300101T100000Z\r\nSUMMARY:Not ours\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    async with httpx.AsyncClient(auth=(USER, PASSWORD)) as client:
        put = await client.put(url, content=foreign, headers={"Content-Type": "text/calendar"})
    assert put.status_code == 201
    result = await connector.execute(make_call(collection))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "another event (UID someone-else@example.org)" in result.error
    (stored,) = await events(collection)
    assert stored.summary == "Not ours"


async def test_all_day_and_zoned_events(collection: str, connector: CalendarConnector) -> None:
    all_day = {"summary": "Offsite", "start": "2030-06-01", "end": "2030-06-03"}
    zoned = {
        "summary": "Call",
        "start": "2030-06-01T09:30:00",
        "timezone": "America/New_York",
        "description": "Line one\nLine two, with; punctuation",
    }
    for key, payload in (("offsite", all_day), ("call", zoned)):
        result = await connector.execute(make_call(collection, payload, key))
        assert isinstance(result, Succeeded), result
    by_summary = {e.summary: e for e in await events(collection)}
    (offsite,) = Calendar.from_ical(by_summary["Offsite"].ical).walk("VEVENT")
    assert offsite.decoded("dtstart") == date(2030, 6, 1)
    assert offsite.decoded("dtend") == date(2030, 6, 3)
    assert "DTSTART;VALUE=DATE:20300601" in by_summary["Offsite"].ical
    assert "DTSTART;TZID=America/New_York:20300601T093000" in by_summary["Call"].ical
    assert "BEGIN:VTIMEZONE" in by_summary["Call"].ical
    (call,) = Calendar.from_ical(by_summary["Call"].ical).walk("VEVENT")
    assert str(call["description"]) == "Line one\nLine two, with; punctuation"


# -- update -------------------------------------------------------------------------------------


def update_payload(etag: str, summary: str, key: str = "planning-2030-05-01") -> dict[str, Any]:
    return {**MEETING, "summary": summary, "event_key": key, "if_match": etag}


async def test_update_with_the_etag_changes_the_event(
    collection: str, connector: CalendarConnector
) -> None:
    created = await connector.execute(make_call(collection))
    assert isinstance(created, Succeeded)
    etag = created.detail["etag"]
    update = make_call(collection, update_payload(etag, "Planning (moved)"), "planning-move-1")
    updated = await connector.execute(update)
    assert isinstance(updated, Succeeded), updated
    assert updated.detail["action"] == "updated"
    assert updated.url == created.url
    assert updated.external_id == created.external_id
    assert updated.detail["etag"] != etag

    (stored,) = await events(collection)
    assert stored.summary == "Planning (moved)"
    assert stored.uid == event_uid("planning-2030-05-01")
    assert stored.etag == updated.detail["etag"]

    # the update's own retry is recognised, not reported as a conflict
    again = await connector.execute(dataclasses.replace(update, attempt=2))
    assert isinstance(again, Succeeded), again
    assert again.detail["action"] == "already updated"
    assert again.detail["etag"] == updated.detail["etag"]


async def test_a_stale_etag_is_a_clear_permanent_conflict(
    collection: str, connector: CalendarConnector
) -> None:
    created = await connector.execute(make_call(collection))
    assert isinstance(created, Succeeded)
    stale = created.detail["etag"]
    first = await connector.execute(
        make_call(collection, update_payload(stale, "Moved by A"), "move-a")
    )
    assert isinstance(first, Succeeded)
    second = await connector.execute(
        make_call(collection, update_payload(stale, "Moved by B"), "move-b")
    )
    assert isinstance(second, Failed)
    assert not second.retryable
    assert second.error.startswith(f"conflict: the event changed since ETag {stale}")
    assert first.detail["etag"] in second.error
    (stored,) = await events(collection)
    assert stored.summary == "Moved by A"


async def test_updating_a_missing_event_fails_permanently(
    collection: str, connector: CalendarConnector
) -> None:
    payload = update_payload('"no-such-etag"', "Ghost", key="never-created")
    result = await connector.execute(make_call(collection, payload, "ghost-update"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "no event at" in result.error
    assert "never created under event_key 'never-created'" in result.error
    assert await events(collection) == []


async def test_an_update_through_the_executor_fails_into_the_dead_letter_queue(
    collection: str,
    connector: CalendarConnector,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    created = await connector.execute(make_call(collection))
    assert isinstance(created, Succeeded)
    settings = dataclasses.replace(settings, accounts={"team": account(collection)})
    fresh = update_payload(created.detail["etag"], "Moved")
    stale = update_payload('"stale"', "Clobber")
    ok = await submit(coordinator, "move-ok", fresh)
    bad = await submit(coordinator, "move-stale", stale)
    await run_executor(store, settings, clock)
    done = await store.get_intent(ok)
    dead = await store.get_intent(bad)
    assert done is not None
    assert dead is not None
    assert done.state is IntentState.SUCCEEDED
    assert dead.state is IntentState.DEAD
    assert dead.attempts == 1
    assert dead.reason is not None
    assert "conflict: the event changed since ETag" in dead.reason
    (stored,) = await events(collection)
    assert stored.summary == "Moved"


# -- reconcile ----------------------------------------------------------------------------------


async def test_reconcile_finds_the_event_or_says_it_is_absent(
    collection: str, connector: CalendarConnector
) -> None:
    call = make_call(collection)
    before = await connector.reconcile(call, started(call))
    assert isinstance(before, Absent)
    assert "no event at" in before.reason

    created = await connector.execute(call)
    assert isinstance(created, Succeeded)
    found = await connector.reconcile(call, started(call))
    assert isinstance(found, Succeeded)
    assert found.detail["etag"] == created.detail["etag"]
    assert found.detail["action"] == "found by reconcile"
    assert (found.url, found.external_id) == (created.url, created.external_id)


async def test_reconcile_of_an_update(collection: str, connector: CalendarConnector) -> None:
    created = await connector.execute(make_call(collection))
    assert isinstance(created, Succeeded)
    update = make_call(collection, update_payload(created.detail["etag"], "Later"), "move")
    assert isinstance(await connector.reconcile(update, started(update)), Absent)
    assert isinstance(await connector.execute(update), Succeeded)
    found = await connector.reconcile(update, started(update))
    assert isinstance(found, Succeeded)
    assert found.detail["action"] == "found by reconcile"


async def test_an_interrupted_create_is_reconciled_by_the_next_executor(
    collection: str,
    connector: CalendarConnector,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    settings = dataclasses.replace(settings, accounts={"team": account(collection)})
    landed = await submit(coordinator, "landed", MEETING)
    lost = await submit(coordinator, "lost", {**MEETING, "summary": "Lost"})
    # an executor claims both, starts both attempts, makes one PUT, then dies
    claims = await store.claim("ex_crashed", 10, settings.executor.lease_ttl, [])
    assert all(await store.start_attempts([c.lease for c in claims]))
    (claim,) = [c for c in claims if c.intent.id == landed]
    put = Call(claim.intent, 1, account(collection), 10.0, Secret(SECRET, PASSWORD))
    assert isinstance(await connector.execute(put), Succeeded)
    clock.advance(settings.executor.lease_ttl + 1)

    await run_executor(store, settings, clock)
    found = await store.get_intent(landed)
    resent = await store.get_intent(lost)
    assert found is not None
    assert resent is not None
    assert found.state is IntentState.SUCCEEDED
    assert found.attempts == 1
    (receipt,) = found.receipts
    assert receipt.source == "reconcile"
    assert receipt.url == event_url(collection, "landed")
    # the other was absent: resent (its create is guarded by If-None-Match) and made once
    assert resent.state is IntentState.SUCCEEDED
    assert [r.outcome for r in resent.receipts] == [Outcome.FAILED, Outcome.SUCCEEDED]
    assert sorted(e.summary for e in await events(collection)) == ["Lost", "Planning"]


# -- failures -----------------------------------------------------------------------------------


async def test_wrong_password_is_permanent(collection: str, connector: CalendarConnector) -> None:
    result = await connector.execute(make_call(collection, password="wrong"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 401" in result.error
    assert "wrong" not in result.error
    assert await events(collection) == []


async def test_missing_collection_is_permanent(
    radicale: LocalRadicale, connector: CalendarConnector
) -> None:
    result = await connector.execute(make_call(f"{radicale.url}/{USER}/nope/"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 40" in result.error


async def test_connection_refused_is_retryable(connector: CalendarConnector) -> None:
    result = await connector.execute(make_call(f"http://127.0.0.1:{free_port()}/{USER}/cal/"))
    assert isinstance(result, Failed)
    assert result.retryable
    assert "cannot connect" in result.error


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"start": "2030-05-01"}, "summary"),
        ({"summary": "x"}, "start"),
        ({"summary": "x", "start": "2030-05-01T10:00:00"}, "offset"),
        ({"summary": "x", "start": "2030-05-01T10:00:00", "timezone": "Mars/Olympus"}, "zone"),
        ({"summary": "x", "start": "2030-05-02", "end": "2030-05-01"}, "after start"),
        ({"summary": "x", "start": "2030-05-01", "end": "2030-05-02T10:00:00Z"}, "both be dates"),
        ({**MEETING, "if_match": '"abc"'}, "event_key"),
        ({**MEETING, "event_key": "k"}, "if_match"),
        ({**MEETING, "event_key": "k", "if_match": 'bad"tag'}, "entity tag"),
        ({**MEETING, "uid": "mine"}, "uid"),
    ],
)
def test_invalid_payloads_are_refused_at_submit(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        build(payload, "k")
    message = str(refused.value)
    assert message.startswith("calendar.put payload: ")
    assert fragment in message
    assert "\n" not in message


def test_unquoted_etag_is_quoted() -> None:
    intent = build({**MEETING, "event_key": "k", "if_match": "abc123"}, "k2")
    CalendarConnector().validate(intent.payload, intent.key)
    from farmhand.connectors.calendar import CalendarPayload

    assert CalendarPayload.model_validate(intent.payload).if_match == '"abc123"'


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({}, "url"),
        ({"url": "caldav.example.org/cal"}, "url"),
        ({"url": "https://caldav.example.org/cal/"}, "username"),
        ({"url": "https://x.example/cal/", "username": "a", "port": 1}, "port"),
    ],
)
def test_invalid_settings_are_refused(settings: dict[str, Any], fragment: str) -> None:
    cfg = AccountConfig(name="team", secret=SECRET, connector=settings)
    with pytest.raises(InvalidInput) as refused:
        CalendarConnector().validate_for(MEETING, cfg)
    assert "[accounts.team.connector]" in str(refused.value)
    assert fragment in str(refused.value)


def test_an_account_without_a_secret_is_refused() -> None:
    cfg = AccountConfig(name="team", connector={"url": "https://x.example/c/", "username": "a"})
    with pytest.raises(InvalidInput, match="needs the account to name a secret"):
        CalendarConnector().validate_for(MEETING, cfg)
    open_cfg = AccountConfig(name="team", connector={"url": "https://x.example/c/", "auth": "none"})
    CalendarConnector().validate_for(MEETING, open_cfg)


def test_is_idempotent() -> None:
    assert CalendarConnector().idempotent(AccountConfig(name="default"))


# -- through the executor and the CLI -----------------------------------------------------------


async def submit(coordinator: Coordinator, key: str, payload: dict[str, Any]) -> str:
    request = SubmitRequest(kind="calendar.put", key=key, payload=payload, account="team")
    return (await coordinator.submit(request)).status.id


async def run_executor(store: Store, settings: Settings, clock: FakeClock) -> None:
    secrets = SecretStore({}, {SECRET: Secret(SECRET, PASSWORD)})
    executor = Executor(store, settings, drain=True, clock=clock, secrets=secrets)
    await executor.run()


async def test_executor_creates_the_event_and_writes_the_receipt(
    collection: str, store: Store, settings: Settings, clock: FakeClock, coordinator: Coordinator
) -> None:
    settings = dataclasses.replace(settings, accounts={"team": account(collection)})
    intent_id = await submit(coordinator, "planning", MEETING)
    await run_executor(store, settings, clock)
    done = await store.get_intent(intent_id)
    assert done is not None
    assert done.state is IntentState.SUCCEEDED
    (receipt,) = done.receipts
    assert receipt.url == event_url(collection, "planning")
    assert receipt.external_id == event_uid("planning")
    (stored,) = await events(collection)
    assert receipt.detail["etag"] == stored.etag


def test_schema_cli_prints_the_payload_schema(tmp_path: Path) -> None:
    prepare_home(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_path)
    farmhand = str(Path(sys.executable).with_name("farmhand"))
    done = subprocess.run(
        [farmhand, "schema", "calendar.put"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema["title"] == "CalendarPayload"
    assert set(schema["required"]) == {"summary", "start"}
    assert {"end", "timezone", "event_key", "if_match"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
