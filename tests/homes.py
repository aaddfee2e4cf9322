"""Test homes: a permissive policy and a coordinator signing key, as `farmhand init` makes.

Executors refuse to act without a policy and refuse unsigned intents, so every test that
runs one starts from a home prepared here (or by `farmhand init` itself).
"""

from __future__ import annotations

from pathlib import Path

from farmhand.keys import Keyring

TEST_POLICY = """
[agents.local]
kinds = ["*"]
accounts = ["*"]

[agents.bot-1]
kinds = ["*"]
accounts = ["*"]
"""


def prepare_home(home: Path, config: str = "") -> Path:
    """Write ``config`` (plus the test policy unless it declares agents) and a coordinator key."""
    home.mkdir(parents=True, exist_ok=True)
    text = config if "[agents" in config else f"{config}\n{TEST_POLICY}"
    (home / "farmhand.toml").write_text(text, encoding="utf-8")
    keyring = Keyring(home / "keys")
    if not keyring.has_signer("coordinator"):
        keyring.generate("coordinator", "coordinator")
    return home
