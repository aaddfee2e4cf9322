"""Kill-switch semantics: which closed gate, if any, blocks an intent."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from farmhand.contracts import GateRule


def closed(rules: Iterable[GateRule]) -> list[GateRule]:
    """The rules that currently stop side effects."""
    return [rule for rule in rules if not rule.open]


def blocking(rules: Sequence[GateRule], kind: str, account: str) -> GateRule | None:
    """The first closed rule whose scope covers ``kind``/``account``."""
    for rule in rules:
        if rule.open:
            continue
        if rule.kind not in (None, kind) or rule.account not in (None, account):
            continue
        return rule
    return None


def everything_closed(rules: Sequence[GateRule]) -> GateRule | None:
    """The global closed rule, if the kill switch is off for everything."""
    return next((r for r in rules if not r.open and r.kind is None and r.account is None), None)
