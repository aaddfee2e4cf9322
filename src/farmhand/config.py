"""Settings: ``farmhand.toml`` under the home directory, ``FARMHAND_*`` variables, CLI flags.

Read once, by the caller that needs them (never at import). Precedence: CLI flag >
environment variable > ``farmhand.toml`` > default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farmhand.errors import InvalidInput

if TYPE_CHECKING:
    from farmhand.policy import Policy

CONFIG_NAME = "farmhand.toml"


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit: ``rate`` calls per second on average, bursts of up to ``burst``."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """What the executor host knows about one account.

    ```toml
    [accounts.billing]
    kinds = ["webhook.post"]          # kinds that may act as this account ("*" = any)
    secret = "BILLING_TOKEN"          # name of the executor-side secret it uses
    honours_idempotency_key = true    # the target dedupes on Idempotency-Key
    rate = 5.0                        # calls per second, shared by every executor...
    burst = 5                         # ...with bursts of up to this many
    [accounts.billing.kind_limits."webhook.post"]
    rate = 2.0
    burst = 2
    [accounts.billing.connector]      # settings the connector reads (server, options)
    host = "smtp.example.org"
    ```
    """

    name: str
    #: the target honours Idempotency-Key (or the connector's equivalent), so re-sending
    #: after an interrupted call cannot duplicate the effect
    honours_idempotency_key: bool = False
    kinds: tuple[str, ...] = ("*",)
    secret: str | None = None
    limit: Limit | None = None
    kind_limits: Mapping[str, Limit] = field(default_factory=dict)
    #: ``[accounts.<name>.connector]``: settings for the connector acting as this account
    #: (its server, port, options), validated by that connector
    connector: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Circuit breaker per connector + account: opens after ``failures`` consecutive
    failures, lets one probe through after ``cooldown`` seconds, closes on success."""

    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Backoff between attempts: full jitter over an exponential ceiling."""

    base_delay: float = 1.0
    max_delay: float = 300.0


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Executor tuning."""

    lease_ttl: float = 30.0
    concurrency: int = 16
    grace: float = 10.0
    #: longest a connector call may take; never more than half the lease TTL, so that a call
    #: ends before its lease could lapse even if no renewal gets through
    call_timeout: float = 10.0
    retry: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a farmhand command needs to know, resolved once."""

    home: Path
    store_url: str
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    #: None when farmhand.toml declares no agents: the executor then refuses to act
    policy: Policy | None = None

    def account(self, name: str) -> AccountConfig:
        """The configuration of ``name`` (defaults when it is not configured)."""
        return self.accounts.get(name) or AccountConfig(name=name)


def default_home() -> Path:
    """``$FARMHAND_HOME`` or ``./.farmhand``."""
    return Path(os.environ.get("FARMHAND_HOME") or ".farmhand").expanduser()


def _number(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidInput(f"{where}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def load(store: str | None = None, home: Path | None = None) -> Settings:
    """Resolve settings from flags, environment and ``farmhand.toml``."""
    home = home or default_home()
    path = home / CONFIG_NAME
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"cannot read {path}: {exc}; fix or remove the file") from exc
    store_url = (
        store
        or os.environ.get("FARMHAND_STORE")
        or data.get("store")
        or f"sqlite://{(home / 'farmhand.db').absolute()}"
    )
    ex = data.get("executor", {})
    retry = ex.get("retry", {})
    where = f"{path} [executor]"
    executor = ExecutorConfig(
        lease_ttl=_number(ex, "lease_ttl", 30.0, where),
        concurrency=int(_number(ex, "concurrency", 16, where)),
        grace=_number(ex, "grace", 10.0, where),
        call_timeout=_number(ex, "call_timeout", 10.0, where),
        retry=RetryConfig(
            base_delay=_number(retry, "base_delay", 1.0, where + ".retry"),
            max_delay=_number(retry, "max_delay", 300.0, where + ".retry"),
        ),
    )
    from farmhand.policy import parse as parse_policy

    accounts = {
        name: _account(name, table, path) for name, table in data.get("accounts", {}).items()
    }
    breaker_table = data.get("breaker", {})
    breaker = BreakerConfig(
        failures=max(1, int(_number(breaker_table, "failures", 5, f"{path} [breaker]"))),
        cooldown=_number(breaker_table, "cooldown", 30.0, f"{path} [breaker]"),
    )
    return Settings(
        home=home,
        store_url=str(store_url),
        executor=executor,
        accounts=accounts,
        breaker=breaker,
        policy=parse_policy(data, str(path)),
    )


def _limit(table: Mapping[str, Any], where: str) -> Limit | None:
    if "rate" not in table and "burst" not in table:
        return None
    rate = _number(table, "rate", 0.0, where)
    if rate <= 0:
        raise InvalidInput(f"{where}: rate must be a positive number of calls per second")
    burst = table.get("burst", max(1, int(rate)))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise InvalidInput(f"{where}: burst must be a positive integer")
    return Limit(rate=rate, burst=burst)


def _account(name: str, table: Mapping[str, Any], path: Path) -> AccountConfig:
    where = f"{path} [accounts.{name}]"
    if not isinstance(table, dict):
        raise InvalidInput(f"{where} must be a table")
    honours = table.get("honours_idempotency_key", False)
    if not isinstance(honours, bool):
        raise InvalidInput(f"{where}: honours_idempotency_key must be true/false")
    kinds = table.get("kinds", ["*"])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise InvalidInput(f"{where}: kinds must be a list of strings")
    secret = table.get("secret")
    if secret is not None and not isinstance(secret, str):
        raise InvalidInput(f"{where}: secret must be the name of a secret (a string)")
    kind_limits = {}
    for kind, sub in table.get("kind_limits", {}).items():
        limit = _limit(sub, f"{where}.kind_limits.{kind}")
        if limit is not None:
            kind_limits[kind] = limit
    connector = table.get("connector", {})
    if not isinstance(connector, dict):
        raise InvalidInput(f"{where}.connector must be a table of connector settings")
    return AccountConfig(
        name=name,
        connector=connector,
        honours_idempotency_key=honours,
        kinds=tuple(kinds),
        secret=secret,
        limit=_limit(table, where),
        kind_limits=kind_limits,
    )
