"""Agent policy: parsing farmhand.toml and checking intents against it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from farmhand.config import load
from farmhand.contracts import Intent
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import Forbidden, InvalidInput
from farmhand.policy import Policy, parse

POLICY = """
[agents.local]
kinds = ["webhook.post", "noop"]
accounts = ["*"]

[agents.poster]
kinds = ["webhook.post"]
accounts = ["social"]
url_hosts = ["hooks.example.org"]

[agents.mailer]
kinds = ["email.send"]
accounts = ["newsletter"]
email_domains = ["example.org"]

[[approvals]]
kind = "webhook.post"
account = "social"
required = 2
approvers = ["alice", "bob", "carol"]
lifetime = 3600
"""


def policy(text: str = POLICY) -> Policy:
    parsed = parse(tomllib.loads(text), "farmhand.toml")
    assert parsed is not None
    return parsed


def intent(
    kind: str = "noop", account: str = "default", agent: str = "local", **payload: Any
) -> Intent:
    built = Coordinator(store=None).build_intent(  # type: ignore[arg-type]
        SubmitRequest(kind="noop", key="k", payload={}, account=account, agent=agent)
    )
    # build_intent validates payloads per connector; kinds without a connector here are
    # constructed directly so the policy is tested on its own
    from farmhand.canonical import payload_hash

    return built.model_copy(
        update={"kind": kind, "payload": payload, "payload_hash": payload_hash(payload)}
    )


def test_no_agents_means_no_policy() -> None:
    assert parse({}, "farmhand.toml") is None
    assert parse({"accounts": {"default": {}}}, "farmhand.toml") is None


def test_allowed_request_passes() -> None:
    policy().check(intent("noop"))
    policy().check(intent("webhook.post", "social", "poster", url="https://hooks.example.org/x"))


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        ({"agent": "stranger"}, "not in the policy"),
        ({"kind": "email.send"}, "may not request email.send"),
        ({"agent": "poster", "kind": "webhook.post", "account": "billing"}, "may not use account"),
    ],
)
def test_refusals_name_the_rule(request_: dict[str, str], fragment: str) -> None:
    with pytest.raises(Forbidden, match=fragment) as refused:
        policy().check(intent(**request_))
    assert refused.value.exit_code == 7


def test_url_host_constraint() -> None:
    poster = {"kind": "webhook.post", "account": "social", "agent": "poster"}
    with pytest.raises(Forbidden, match=re.escape("may not call host 'evil.example.com'")):
        policy().check(intent(**poster, url="https://evil.example.com/hook"))


def test_email_domain_constraint() -> None:
    mailer = {"kind": "email.send", "account": "newsletter", "agent": "mailer"}
    policy().check(intent(**mailer, to=["ann@example.org"], cc="bo@EXAMPLE.org"))
    with pytest.raises(Forbidden, match=re.escape("may not write to 'eve@evil.test'")):
        policy().check(intent(**mailer, to=["ann@example.org", "eve@evil.test"]))


def test_approval_rule_matching() -> None:
    rule = policy().approval_rule(intent("webhook.post", "social", "poster"))
    assert rule is not None
    assert (rule.required, rule.approvers, rule.lifetime) == (2, ("alice", "bob", "carol"), 3600)
    assert policy().approval_rule(intent("noop")) is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[agents.a]\nkinds = 'noop'", "kinds must be a list of strings"),
        ("[agents.a]\n[[approvals]]\napprovers = []", "approvers must name at least one"),
        ("[agents.a]\n[[approvals]]\napprovers = ['x']\nrequired = 2", "required must be from 1"),
        (
            "[agents.a]\n[[approvals]]\napprovers = ['x']\nlifetime = -1",
            "lifetime must be a positive",
        ),
    ],
)
def test_bad_policy_is_a_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse(tomllib.loads(text), "farmhand.toml")


def test_settings_carry_policy_limits_and_breaker(tmp_path: Path) -> None:
    (tmp_path / "farmhand.toml").write_text(
        POLICY
        + """
[breaker]
failures = 3
cooldown = 12

[accounts.social]
secret = "SOCIAL_TOKEN"
rate = 5.0
burst = 5
kinds = ["webhook.post"]
[accounts.social.kind_limits."webhook.post"]
rate = 2.0
burst = 1
"""
    )
    settings = load(home=tmp_path)
    assert settings.policy is not None
    assert set(settings.policy.agents) == {"local", "poster", "mailer"}
    account = settings.account("social")
    assert account.secret == "SOCIAL_TOKEN"
    assert account.limit is not None
    assert (account.limit.rate, account.limit.burst) == (5.0, 5)
    assert account.kind_limits["webhook.post"].burst == 1
    assert (settings.breaker.failures, settings.breaker.cooldown) == (3, 12.0)


@pytest.mark.parametrize(
    ("account", "fragment"),
    [
        ("rate = 0", "rate must be a positive"),
        ("rate = 1\nburst = 0", "burst must be a positive integer"),
        ("secret = 3", "secret must be the name"),
        ("honours_idempotency_key = 'yes'", "must be true/false"),
    ],
)
def test_bad_account_config(tmp_path: Path, account: str, fragment: str) -> None:
    (tmp_path / "farmhand.toml").write_text(f"[accounts.a]\n{account}\n")
    with pytest.raises(InvalidInput, match=fragment):
        load(home=tmp_path)
