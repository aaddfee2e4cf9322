"""``x.post`` against a loopback stand-in of the X API v2 that verifies OAuth 1.0a signatures
and bearer tokens: classification, rate-limit feedback into the account's central bucket,
and reconcile by reading the account's timeline."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from farmhand.clock import FakeClock
from farmhand.config import AccountConfig, Settings
from farmhand.connectors.base import Call, Failed, Succeeded, Uncertain
from farmhand.connectors.x import (
    LOOKUP_MARGIN,
    BearerToken,
    OAuth1Credentials,
    XConnector,
    parse_credentials,
    rate_limit_wait,
)
from farmhand.contracts import Attempt, Intent, IntentState, Outcome
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput
from farmhand.executor import Executor
from farmhand.secrets import Secret, SecretStore
from farmhand.store import Store
from farmhand.testing.servers import free_port
from farmhand.testing.xapi import XApiStandIn
from homes import prepare_home

SECRET = "X_CREDENTIALS"
ACCOUNT = "bot"


@pytest.fixture
def clock() -> FakeClock:
    """The store's and executor's clock starts at the real time: the stand-in stamps posts
    with it, and reconcile compares them with the attempt's start."""
    return FakeClock(start=time.time())


@pytest.fixture
def api() -> Iterator[XApiStandIn]:
    with XApiStandIn(username="farmhand_bot") as running:
        yield running


@pytest.fixture
async def connector() -> AsyncIterator[XConnector]:
    x = XConnector()
    yield x
    await x.aclose()


def account(api: XApiStandIn, **settings: Any) -> AccountConfig:
    connector = {"api_base": api.url, "username": api.username, **settings}
    return AccountConfig(name=ACCOUNT, secret=SECRET, connector=connector)


def build(payload: dict[str, Any], key: str = "post-1") -> Intent:
    coordinator = Coordinator(store=None)  # type: ignore[arg-type]  # build_intent needs no store
    return coordinator.build_intent(SubmitRequest(kind="x.post", key=key, payload=payload))


def make_call(
    api: XApiStandIn,
    payload: dict[str, Any] | str = "Hello from farmhand",
    key: str = "post-1",
    *,
    secret: str | None = None,
    timeout: float = 5.0,
    **settings: Any,
) -> Call:
    body = {"text": payload} if isinstance(payload, str) else payload
    return Call(
        intent=build(body, key),
        attempt=1,
        account=account(api, **settings),
        timeout=timeout,
        secret=Secret(SECRET, api.oauth1_secret() if secret is None else secret),
    )


def started(call: Call, at: float | None = None) -> Attempt:
    return Attempt(
        intent_id=call.intent.id,
        attempt=1,
        executor="ex_gone",
        fencing_token=1,
        started_at=datetime.fromtimestamp(time.time() if at is None else at, UTC),
    )


def creates(api: XApiStandIn) -> list[int]:
    return [r.status for r in api.requests() if r.method == "POST"]


# -- success ------------------------------------------------------------------------------------


async def test_post_signed_with_oauth1(api: XApiStandIn, connector: XConnector) -> None:
    result = await connector.execute(make_call(api))
    assert isinstance(result, Succeeded), result
    (post,) = api.posts()
    assert post.text == "Hello from farmhand"
    assert result.external_id == post.id
    assert result.url == f"https://x.com/farmhand_bot/status/{post.id}"
    assert result.detail == {"status": 201}
    assert [(r.method, r.path, r.auth, r.status) for r in api.requests()] == [
        ("POST", "/2/tweets", "oauth1", 201)
    ]


@pytest.mark.parametrize("form", ["bare", "json"])
async def test_post_with_an_oauth2_user_token(
    api: XApiStandIn, connector: XConnector, form: str
) -> None:
    token = api.bearer_secret()
    secret = token if form == "bare" else json.dumps({"bearer_token": token})
    result = await connector.execute(make_call(api, secret=secret))
    assert isinstance(result, Succeeded), result
    assert [r.auth for r in api.requests()] == ["bearer"]
    assert len(api.posts()) == 1


async def test_reply_and_quote(api: XApiStandIn, connector: XConnector) -> None:
    first = api.add_post("The thread starts here")
    reply = {"text": "And goes on", "reply": {"in_reply_to_tweet_id": first.id}}
    quote = {"text": "Worth reading", "quote_tweet_id": first.id}
    for key, payload in (("reply", reply), ("quote", quote)):
        result = await connector.execute(make_call(api, payload, key))
        assert isinstance(result, Succeeded), result
    _, replied, quoted = api.posts()
    assert (replied.text, replied.reply_to, replied.quote_of) == ("And goes on", first.id, None)
    assert (quoted.text, quoted.reply_to, quoted.quote_of) == ("Worth reading", None, first.id)


async def test_without_a_username_the_url_is_the_generic_one(
    api: XApiStandIn, connector: XConnector
) -> None:
    call = make_call(api)
    call = dataclasses.replace(
        call, account=AccountConfig(ACCOUNT, connector={"api_base": api.url})
    )
    result = await connector.execute(call)
    assert isinstance(result, Succeeded)
    assert result.url == f"https://x.com/i/web/status/{result.external_id}"


# -- authentication -----------------------------------------------------------------------------


async def test_a_wrong_oauth1_secret_fails_the_signature(
    api: XApiStandIn, connector: XConnector
) -> None:
    credentials = json.loads(api.oauth1_secret())
    credentials["access_token_secret"] = "not-the-right-secret-at-all"
    secret = json.dumps(credentials)
    result = await connector.execute(make_call(api, secret=secret))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 401" in result.error
    assert "check the account's credentials" in result.error
    assert api.posts() == []
    assert [r.auth for r in api.requests()] == [None]


async def test_a_wrong_bearer_token_is_rejected(api: XApiStandIn, connector: XConnector) -> None:
    result = await connector.execute(make_call(api, secret="a-token-x-never-issued"))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 401" in result.error
    assert api.posts() == []


async def test_the_stand_in_refuses_unsigned_and_replayed_requests(api: XApiStandIn) -> None:
    from oauthlib.oauth1 import Client

    url = f"{api.url}/2/users/me"
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 401
        signer = Client(
            api.consumer_key,
            client_secret=api.consumer_secret,
            resource_owner_key=api.access_token,
            resource_owner_secret=api.access_token_secret,
        )
        _, headers, _ = signer.sign(url)
        assert (await client.get(url, headers=headers)).status_code == 200
        assert (await client.get(url, headers=headers)).status_code == 401  # same nonce
        _, headers, _ = signer.sign(url)
        assert (await client.get(f"{url}?x=1", headers=headers)).status_code == 401  # other URL


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ('{"consumer_key": "a"}', "missing consumer_secret, access_token, access_token_secret"),
        ("{not json", "not a JSON object"),
        ("two words", "one word"),
        ('{"bearer_token": "t", "extra": 1}', "missing consumer_key"),
    ],
)
async def test_a_malformed_secret_is_permanent_and_shows_no_value(
    api: XApiStandIn, connector: XConnector, secret: str, fragment: str
) -> None:
    result = await connector.execute(make_call(api, secret=secret))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert fragment in result.error
    assert "words" not in result.error
    assert api.requests() == []


def test_parse_credentials_forms() -> None:
    four = {
        "consumer_key": "ck",
        "consumer_secret": "cs",
        "access_token": "1-at",
        "access_token_secret": "ats",
    }
    assert parse_credentials(json.dumps(four)) == OAuth1Credentials("ck", "cs", "1-at", "ats")
    assert parse_credentials(" tok \n") == BearerToken("tok")
    assert parse_credentials('{"bearer_token": "tok"}') == BearerToken("tok")
    assert "cs" not in repr(parse_credentials(json.dumps(four)))


# -- rate limits --------------------------------------------------------------------------------


async def test_429_is_retryable_until_the_reset(api: XApiStandIn, connector: XConnector) -> None:
    api.rate_limit_next(reset_in=120)
    result = await connector.execute(make_call(api))
    assert isinstance(result, Failed)
    assert result.retryable
    assert result.retry_after is not None
    assert 115 <= result.retry_after <= 121
    assert "HTTP 429" in result.error
    assert api.posts() == []
    # the next call goes through
    assert isinstance(await connector.execute(make_call(api)), Succeeded)


def test_rate_limit_wait_reads_the_headers_x_sends() -> None:
    now = 1_800_000_000.0
    window = httpx.Headers(
        {"x-rate-limit-remaining": "0", "x-rate-limit-reset": str(int(now) + 300)}
    )
    assert rate_limit_wait(window, now) == 300.0
    daily = httpx.Headers(
        {
            "x-rate-limit-remaining": "40",
            "x-rate-limit-reset": str(int(now) + 300),
            "x-user-limit-24hour-remaining": "0",
            "x-user-limit-24hour-reset": str(int(now) + 7200),
        }
    )
    assert rate_limit_wait(daily, now) == 7200.0
    assert rate_limit_wait(httpx.Headers({"Retry-After": "42"}), now) == 42.0
    assert rate_limit_wait(httpx.Headers({"x-rate-limit-reset": str(int(now) - 5)}), now) == 0.0
    assert rate_limit_wait(httpx.Headers({}), now) is None


# -- duplicates, lost answers, server errors ----------------------------------------------------


async def test_a_repeat_of_our_own_post_is_already_posted(
    api: XApiStandIn, connector: XConnector
) -> None:
    call = make_call(api)
    first = await connector.execute(call)
    again = await connector.execute(dataclasses.replace(call, attempt=2))
    assert isinstance(first, Succeeded)
    assert isinstance(again, Succeeded), again
    assert again.external_id == first.external_id
    assert again.url == first.url
    assert again.detail["found_on_timeline"] is True
    assert "duplicate" in again.detail["after"]
    assert len(api.posts()) == 1
    assert creates(api) == [201, 403]


async def test_a_duplicate_of_an_older_post_is_uncertain(
    api: XApiStandIn, connector: XConnector
) -> None:
    api.add_post("Hello from farmhand", created_at=time.time() - 3 * 3600)
    result = await connector.execute(make_call(api))
    assert isinstance(result, Uncertain)
    assert "duplicate" in result.error
    assert "farmhand will not post again" in result.error
    assert len(api.posts()) == 1


async def test_a_5xx_that_did_not_post_is_uncertain(
    api: XApiStandIn, connector: XConnector
) -> None:
    api.fail_next(503)
    result = await connector.execute(make_call(api))
    assert isinstance(result, Uncertain)
    assert "HTTP 503" in result.error
    assert "no post with this text since" in result.error
    assert api.posts() == []


async def test_a_5xx_that_did_post_is_found(api: XApiStandIn, connector: XConnector) -> None:
    api.fail_next(500, posted=True)
    result = await connector.execute(make_call(api))
    assert isinstance(result, Succeeded), result
    (post,) = api.posts()
    assert result.external_id == post.id
    assert result.detail["found_on_timeline"] is True
    assert "HTTP 500" in result.detail["after"]


async def test_a_lost_answer_is_found_on_the_timeline(
    api: XApiStandIn, connector: XConnector
) -> None:
    api.drop_next_response()
    result = await connector.execute(make_call(api))
    assert isinstance(result, Succeeded), result
    (post,) = api.posts()
    assert result.external_id == post.id
    assert result.url == f"https://x.com/farmhand_bot/status/{post.id}"
    assert "may have reached X" in result.detail["after"]


async def test_a_late_answer_is_found_on_the_timeline(
    api: XApiStandIn, connector: XConnector
) -> None:
    api.stall_next(5.0)
    result = await connector.execute(make_call(api, timeout=1.5, user_id=api.user_id))
    assert isinstance(result, Succeeded), result
    assert "ReadTimeout" in result.detail["after"]
    assert len(api.posts()) == 1


async def test_connection_refused_is_retryable(connector: XConnector) -> None:
    with XApiStandIn() as gone:
        call = make_call(gone)
    call = dataclasses.replace(
        call,
        account=AccountConfig(ACCOUNT, connector={"api_base": f"http://127.0.0.1:{free_port()}"}),
    )
    result = await connector.execute(call)
    assert isinstance(result, Failed)
    assert result.retryable
    assert "cannot connect" in result.error


async def test_other_4xx_is_permanent(api: XApiStandIn, connector: XConnector) -> None:
    payload = {"text": "Replying into the void", "reply": {"in_reply_to_tweet_id": "12345"}}
    result = await connector.execute(make_call(api, payload))
    assert isinstance(result, Failed)
    assert not result.retryable
    assert "HTTP 403" in result.error
    assert "deleted or not visible" in result.error
    assert api.posts() == []


async def test_errors_never_show_the_credentials(api: XApiStandIn, connector: XConnector) -> None:
    credentials = json.loads(api.oauth1_secret())
    credentials["consumer_secret"] = "wrong-consumer-secret-123"
    result = await connector.execute(make_call(api, secret=json.dumps(credentials)))
    assert isinstance(result, Failed)
    for value in credentials.values():
        assert value not in result.error


# -- reconcile ----------------------------------------------------------------------------------


async def test_reconcile_finds_a_post_that_landed(api: XApiStandIn, connector: XConnector) -> None:
    text = "Deploys & rollbacks: <b>notes</b> at https://example.org/notes?id=7 #ops"
    call = make_call(api, text)
    attempt = started(call)
    landed = api.add_post(text)  # the call reached X; its answer was lost with the executor
    found = await connector.reconcile(call, attempt)
    assert isinstance(found, Succeeded), found
    assert found.external_id == landed.id
    assert found.url == f"https://x.com/farmhand_bot/status/{landed.id}"
    assert found.detail["found_on_timeline"] is True
    (page,) = [r for r in api.requests() if r.path.endswith("/tweets") and r.method == "GET"]
    assert page.auth == "oauth1"
    # the timeline showed it as X does, escaped and with the link shortened: matched anyway
    async with httpx.AsyncClient() as client:
        shown = await client.get(
            f"{api.url}/2/users/{api.user_id}/tweets?tweet.fields=entities",
            headers={"Authorization": f"Bearer {api.bearer_token}"},
        )
    (entry,) = shown.json()["data"]
    assert entry["text"].startswith("Deploys &amp; rollbacks: &lt;b&gt;notes&lt;/b&gt;")
    assert "https://t.co/" in entry["text"]
    assert "example.org" not in entry["text"]


async def test_reconcile_without_the_post_is_uncertain(
    api: XApiStandIn, connector: XConnector
) -> None:
    call = make_call(api)
    api.add_post("Hello from farmhand", created_at=time.time() - LOOKUP_MARGIN - 600)
    api.add_post("Something else")
    result = await connector.reconcile(call, started(call))
    assert isinstance(result, Uncertain)
    assert "no post with this text since" in result.error
    assert "farmhand resolve" in result.error


async def test_reconcile_checks_the_reply_target(api: XApiStandIn, connector: XConnector) -> None:
    one, two = api.add_post("one"), api.add_post("two")
    payload = {"text": "same words", "reply": {"in_reply_to_tweet_id": two.id}}
    call = make_call(api, payload)
    attempt = started(call)
    api.add_post("same words", reply_to=one.id)
    assert isinstance(await connector.reconcile(call, attempt), Uncertain)
    mine = api.add_post("@farmhand_bot same words", reply_to=two.id)
    found = await connector.reconcile(call, attempt)
    assert isinstance(found, Succeeded)
    assert found.external_id == mine.id


async def test_reconcile_reads_further_pages(api: XApiStandIn, connector: XConnector) -> None:
    call = make_call(api, "the one to find")
    attempt = started(call)
    target = api.add_post("the one to find")
    for i in range(230):
        api.add_post(f"later post {i}")
    found = await connector.reconcile(call, attempt)
    assert isinstance(found, Succeeded)
    assert found.external_id == target.id
    pages = [r for r in api.requests() if r.path.endswith("/tweets")]
    assert len(pages) == 3


async def test_reconcile_when_the_timeline_cannot_be_read(
    api: XApiStandIn, connector: XConnector
) -> None:
    call = make_call(api, user_id="1234")  # not the stand-in's user: 404
    result = await connector.reconcile(call, started(call))
    assert isinstance(result, Uncertain)
    assert "looking for the post on X failed" in result.error
    assert "HTTP 404" in result.error


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"text": "hi", "reply": {"in_reply_to_tweet_id": "abc"}}, "in_reply_to_tweet_id"),
        ({"text": "hi", "reply": "123"}, "reply"),
        ({"text": "hi", "quote_tweet_id": 5}, "quote_tweet_id"),
        ({"text": "hi", "media": {}}, "media"),
    ],
)
def test_invalid_payloads_are_refused_at_submit(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        build(payload)
    message = str(refused.value)
    assert message.startswith("x.post payload: ")
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"api_base": "api.x.com"}, "api_base"),
        ({"username": "not a handle"}, "username"),
        ({"user_id": "me"}, "user_id"),
        ({"token": "x"}, "token"),
    ],
)
def test_invalid_settings_are_refused(settings: dict[str, Any], fragment: str) -> None:
    cfg = AccountConfig(name=ACCOUNT, secret=SECRET, connector=settings)
    with pytest.raises(InvalidInput) as refused:
        XConnector().validate_for({"text": "hi"}, cfg)
    assert f"[accounts.{ACCOUNT}.connector]" in str(refused.value)
    assert fragment in str(refused.value)


def test_an_account_needs_a_secret_and_is_never_idempotent() -> None:
    with pytest.raises(InvalidInput, match="needs the account to name a secret"):
        XConnector().validate_for({"text": "hi"}, AccountConfig(name=ACCOUNT))
    XConnector().validate_for({"text": "hi"}, AccountConfig(name=ACCOUNT, secret=SECRET))
    assert not XConnector().idempotent(AccountConfig(name=ACCOUNT, honours_idempotency_key=True))


# -- through the executor -----------------------------------------------------------------------


def with_account(settings: Settings, api: XApiStandIn) -> Settings:
    return dataclasses.replace(settings, accounts={ACCOUNT: account(api, user_id=api.user_id)})


async def submit(coordinator: Coordinator, key: str, text: str) -> str:
    request = SubmitRequest(kind="x.post", key=key, payload={"text": text}, account=ACCOUNT)
    return (await coordinator.submit(request)).status.id


async def run_executor(
    store: Store, settings: Settings, clock: FakeClock, api: XApiStandIn, executor_id: str
) -> None:
    secrets = SecretStore({}, {SECRET: Secret(SECRET, api.oauth1_secret())})
    executor = Executor(
        store, settings, drain=True, clock=clock, secrets=secrets, executor_id=executor_id
    )
    await executor.run()


async def state(store: Store, intent_id: str) -> Any:
    found = await store.get_intent(intent_id)
    assert found is not None
    return found


async def test_a_429_pauses_the_account_for_every_executor_until_the_reset(
    api: XApiStandIn,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    settings = with_account(settings, api)
    api.rate_limit_next(reset_in=600)
    first = await submit(coordinator, "first", "First post")
    await run_executor(store, settings, clock, api, "ex_1")
    limited = await state(store, first)
    assert limited.state is IntentState.RETRY_WAIT
    assert limited.receipts[0].detail["retry_after"] >= 590
    (pause,) = [e for e in await store.audit(limit=100) if e.action == "bucket.pause"]
    assert pause.detail["bucket"] == f"account:{ACCOUNT}"
    assert pause.reason is not None
    assert pause.reason.startswith("provider asked to retry after")
    assert "HTTP 429" in pause.reason

    # another executor, which learned nothing itself, holds the account's new intents
    later = await submit(coordinator, "later", "Later post")
    await run_executor(store, settings, clock, api, "ex_2")
    held = await state(store, later)
    assert held.state is IntentState.PENDING
    assert held.attempts == 0
    assert held.reason.startswith(f"rate limit: bucket account:{ACCOUNT} is paused until")
    assert creates(api) == [429]

    clock.advance(601)
    await run_executor(store, settings, clock, api, "ex_3")
    for intent_id in (first, later):
        assert (await state(store, intent_id)).state is IntentState.SUCCEEDED
    assert sorted(p.text for p in api.posts()) == ["First post", "Later post"]
    assert creates(api) == [429, 201, 201]


async def test_a_5xx_that_did_not_post_parks_the_intent_in_unknown(
    api: XApiStandIn,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    settings = with_account(settings, api)
    api.fail_next(503)
    intent_id = await submit(coordinator, "p", "Maybe posted")
    await run_executor(store, settings, clock, api, "ex_1")
    parked = await state(store, intent_id)
    assert parked.state is IntentState.UNKNOWN
    assert parked.attempts == 1
    (receipt,) = parked.receipts
    assert receipt.outcome is Outcome.UNKNOWN
    assert "HTTP 503" in (receipt.error or "")
    assert api.posts() == []
    assert creates(api) == [503]  # never sent again


async def test_an_interrupted_attempt_is_reconciled_from_the_timeline(
    api: XApiStandIn,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    settings = with_account(settings, api)
    landed = await submit(coordinator, "landed", "This one reached X")
    lost = await submit(coordinator, "lost", "This one never left")
    # an executor claims both, starts both attempts, sends one, then dies
    claims = await store.claim("ex_crashed", 10, settings.executor.lease_ttl, [])
    assert all(await store.start_attempts([c.lease for c in claims]))
    post = api.add_post("This one reached X")
    clock.advance(settings.executor.lease_ttl + 1)

    await run_executor(store, settings, clock, api, "ex_2")
    found = await state(store, landed)
    assert found.state is IntentState.SUCCEEDED
    (receipt,) = found.receipts
    assert receipt.source == "reconcile"
    assert receipt.external_id == post.id
    assert receipt.url == f"https://x.com/farmhand_bot/status/{post.id}"
    unknown = await state(store, lost)
    assert unknown.state is IntentState.UNKNOWN
    assert "farmhand resolve" in (unknown.reason or "")
    assert creates(api) == []  # nothing was posted blindly
    assert len(api.posts()) == 1


# -- the CLI ------------------------------------------------------------------------------------


def test_schema_cli_prints_the_payload_schema(tmp_path: Path) -> None:
    prepare_home(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_path)
    farmhand = str(Path(sys.executable).with_name("farmhand"))
    done = subprocess.run(
        [farmhand, "schema", "x.post"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema["title"] == "XPayload"
    assert schema["required"] == ["text"]
    assert set(schema["properties"]) == {"text", "reply", "quote_tweet_id"}
