"""``farmhand doctor``: check this host's setup; exit 1 when any check fails."""

from __future__ import annotations

import sys

import typer

from farmhand.cli.common import JsonOption, StoreOption, print_json

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def doctor(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Check the home, secrets (names only), policy, signing keys, store and clock.

    Each check says ok, warn or fail with a hint; exit code 1 when any check fails. Changes
    nothing: the store is opened read-only and secret values are never shown.
    """
    import asyncio

    from farmhand import doctor as checks

    report = asyncio.run(checks.run(store=store))
    if as_json:
        print_json(report.to_json())
    else:
        width = max(len(c.name) for c in report.checks)
        for check in report.checks:
            sys.stdout.write(f"{_MARK[check.status]}  {check.name:<{width}}  {check.detail}\n")
            if check.hint and check.status != "ok":
                sys.stdout.write(f"{'':4}  {'':<{width}}  -> {check.hint}\n")
        failed = sum(c.status == "fail" for c in report.checks)
        warned = sum(c.status == "warn" for c in report.checks)
        sys.stdout.write(
            f"{'ok' if report.ok else 'not ok'}: {failed} failed, {warned} warnings, "
            f"{len(report.checks)} checks\n"
        )
    if not report.ok:
        raise typer.Exit(1)
