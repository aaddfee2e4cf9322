"""Agent policy: which agent may request which kinds, on which accounts, with what payloads,
and which intents need approvals. Parsed from ``farmhand.toml``; checked by the coordinator
at submit and again by the executor before every attempt.

```toml
[agents.local]
kinds = ["webhook.post", "noop"]      # "*" = any kind
accounts = ["*"]                      # "*" = any account
url_hosts = ["hooks.example.org"]     # optional: webhook.post may only call these hosts
email_domains = ["example.org"]       # optional: email.send may only write to these domains

[[approvals]]
kind = "email.send"                   # "*" (default) matches any; so do account and agent
account = "*"
agent = "*"
required = 1                          # distinct approvers needed
approvers = ["alice", "bob"]          # names whose keys sign approvals
lifetime = 86400                      # seconds an approval stays valid
```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from farmhand.errors import Forbidden, InvalidInput

if TYPE_CHECKING:
    # only annotations: reading farmhand.toml must not import pydantic (~100 ms), which
    # e.g. `farmhand keys` never needs
    from farmhand.contracts import Intent

ANY = "*"


def _matches(patterns: Iterable[str], value: str) -> bool:
    return any(p in (ANY, value) for p in patterns)


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """What one agent may request."""

    name: str
    kinds: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    #: webhook.post: hosts the payload's url may name (None = any)
    url_hosts: tuple[str, ...] | None = None
    #: email.send: domains every recipient must belong to (None = any)
    email_domains: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ApprovalRule:
    """Intents matching kind/account/agent need ``required`` approvals from ``approvers``."""

    approvers: tuple[str, ...]
    kind: str = ANY
    account: str = ANY
    agent: str = ANY
    required: int = 1
    lifetime: float = 86_400.0

    def applies(self, intent: Intent) -> bool:
        """Whether this rule covers ``intent``."""
        return (
            _matches((self.kind,), intent.kind)
            and _matches((self.account,), intent.account)
            and _matches((self.agent,), intent.agent)
        )


def _recipients(payload: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    for name in ("to", "cc", "bcc"):
        value = payload.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(str(v) for v in value)
    return found


@dataclass(frozen=True, slots=True)
class Policy:
    """The agents' permissions and the approval rules."""

    agents: Mapping[str, AgentPolicy] = field(default_factory=dict)
    approvals: tuple[ApprovalRule, ...] = ()

    def check(self, intent: Intent) -> None:
        """Raise :class:`Forbidden` unless ``intent``'s agent may request it."""
        agent = self.agents.get(intent.agent)
        if agent is None:
            raise Forbidden(
                f"agent {intent.agent!r} is not in the policy; add [agents.{intent.agent}] to "
                "farmhand.toml"
            )
        if not _matches(agent.kinds, intent.kind):
            raise Forbidden(f"agent {intent.agent!r} may not request {intent.kind}")
        if not _matches(agent.accounts, intent.account):
            raise Forbidden(f"agent {intent.agent!r} may not use account {intent.account!r}")
        payload = intent.payload
        if agent.url_hosts is not None and isinstance(payload.get("url"), str):
            host = urlsplit(payload["url"]).hostname or ""
            if host not in agent.url_hosts:
                raise Forbidden(
                    f"agent {intent.agent!r} may not call host {host!r}; allowed: "
                    + ", ".join(agent.url_hosts)
                )
        if agent.email_domains is not None:
            for address in _recipients(payload):
                domain = address.rpartition("@")[2].strip(" >").lower()
                if domain not in agent.email_domains:
                    raise Forbidden(
                        f"agent {intent.agent!r} may not write to {address!r}; allowed "
                        "domains: " + ", ".join(agent.email_domains)
                    )

    def approval_rule(self, intent: Intent) -> ApprovalRule | None:
        """The first approval rule covering ``intent``, if any."""
        return next((rule for rule in self.approvals if rule.applies(intent)), None)


def _strings(where: str, table: Mapping[str, Any], key: str, default: Any = ()) -> Any:
    value = table.get(key, default)
    if value is None or value == default:
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{where}: {key} must be a list of strings")
    return tuple(value)


def parse(data: Mapping[str, Any], where: str) -> Policy | None:
    """The policy in a parsed ``farmhand.toml``, or None when it declares no agents."""
    agents_table = data.get("agents")
    if agents_table is None:
        return None
    if not isinstance(agents_table, dict):
        raise InvalidInput(f"{where}: [agents] must be a table of agents")
    agents = {}
    for name, table in agents_table.items():
        at = f"{where} [agents.{name}]"
        if not isinstance(table, dict):
            raise InvalidInput(f"{at} must be a table")
        agents[name] = AgentPolicy(
            name=name,
            kinds=_strings(at, table, "kinds"),
            accounts=_strings(at, table, "accounts"),
            url_hosts=_strings(at, table, "url_hosts", None),
            email_domains=_strings(at, table, "email_domains", None),
        )
    rules = []
    for index, table in enumerate(data.get("approvals", []), start=1):
        at = f"{where} [[approvals]] #{index}"
        approvers = _strings(at, table, "approvers")
        required = table.get("required", 1)
        lifetime = table.get("lifetime", 86_400)
        if not approvers:
            raise InvalidInput(f"{at}: approvers must name at least one approver")
        if not isinstance(required, int) or not 1 <= required <= len(approvers):
            raise InvalidInput(f"{at}: required must be from 1 to the number of approvers")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            raise InvalidInput(f"{at}: lifetime must be a positive number of seconds")
        rules.append(
            ApprovalRule(
                approvers=approvers,
                kind=str(table.get("kind", ANY)),
                account=str(table.get("account", ANY)),
                agent=str(table.get("agent", ANY)),
                required=required,
                lifetime=float(lifetime),
            )
        )
    return Policy(agents=agents, approvals=tuple(rules))
