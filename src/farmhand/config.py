"""Settings: ``farmhand.toml`` under the home directory, ``FARMHAND_*`` variables, CLI flags.

Read once, by the caller that needs them (never at import). Precedence: CLI flag >
environment variable > ``farmhand.toml`` > default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmhand.errors import InvalidInput

CONFIG_NAME = "farmhand.toml"


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """What the executor host knows about one account."""

    name: str
    #: the target honours Idempotency-Key (or the connector's equivalent), so re-sending
    #: after an interrupted call cannot duplicate the effect
    honours_idempotency_key: bool = False


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
    retry: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a farmhand command needs to know, resolved once."""

    home: Path
    store_url: str
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    accounts: dict[str, AccountConfig] = field(default_factory=dict)

    def account(self, name: str) -> AccountConfig:
        """The configuration of ``name`` (defaults when it is not configured)."""
        return self.accounts.get(name) or AccountConfig(name=name)


def default_home() -> Path:
    """``$FARMHAND_HOME`` or ``./.farmhand``."""
    return Path(os.environ.get("FARMHAND_HOME") or ".farmhand").expanduser()


def _number(table: dict[str, Any], key: str, default: float, where: str) -> float:
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
        retry=RetryConfig(
            base_delay=_number(retry, "base_delay", 1.0, where + ".retry"),
            max_delay=_number(retry, "max_delay", 300.0, where + ".retry"),
        ),
    )
    accounts = {}
    for name, table in data.get("accounts", {}).items():
        honours = table.get("honours_idempotency_key", False)
        if not isinstance(honours, bool):
            raise InvalidInput(
                f"{path} [accounts.{name}]: honours_idempotency_key must be true/false"
            )
        accounts[name] = AccountConfig(name=name, honours_idempotency_key=honours)
    return Settings(home=home, store_url=str(store_url), executor=executor, accounts=accounts)
