"""Approvals through the CLI: submit -> awaiting_approval -> approve/reject -> executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from homes import prepare_home

FARMHAND = str(Path(sys.executable).with_name("farmhand"))

POLICY = """
[agents.local]
kinds = ["noop"]
accounts = ["*"]

[[approvals]]
account = "social"
required = 1
approvers = ["alice"]
lifetime = 600
"""


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    return subprocess.run([FARMHAND, *args], env=env, capture_output=True, text=True, timeout=60)


def as_json(home: Path, *args: str) -> Any:
    done = run(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_approve_then_execute_and_reject(tmp_path: Path) -> None:
    home = prepare_home(tmp_path, POLICY)
    assert run(home, "keys", "generate", "--owner", "alice", "--role", "approver").returncode == 0
    assert run(home, "keys", "generate", "--owner", "bob", "--role", "approver").returncode == 0
    held = as_json(
        home, "submit", "noop", "--key", "post-1", "--payload", "{}", "--account", "social"
    )
    other = as_json(
        home, "submit", "noop", "--key", "post-2", "--payload", "{}", "--account", "social"
    )
    assert held["state"] == "awaiting_approval"
    waiting = as_json(home, "list", "--state", "awaiting_approval")
    assert sorted(i["key"] for i in waiting) == ["post-1", "post-2"]

    # nothing runs while approval is pending
    assert run(home, "executor", "run", "--drain").returncode == 0
    assert as_json(home, "status", "post-1")["state"] == "awaiting_approval"

    refused = run(home, "approve", "post-1", "--as", "bob")
    assert refused.returncode == 7
    assert refused.stderr.startswith("farmhand: error: 'bob' is not an approver")
    no_key = run(home, "approve", "post-1", "--as", "carol")
    assert no_key.returncode == 8

    approved = as_json(home, "approve", held["id"], "--as", "alice", "--reason", "looks right")
    assert approved["state"] == "pending"
    rejected = as_json(home, "reject", other["id"], "--as", "alice", "--reason", "off-brand")
    assert rejected["state"] == "rejected"

    assert run(home, "executor", "run", "--drain").returncode == 0
    assert as_json(home, "status", "post-1")["state"] == "succeeded"
    assert as_json(home, "status", "post-2")["state"] == "rejected"
    actions = [e["action"] for e in as_json(home, "audit", "--intent", "post-1")]
    assert {"approval.approve", "approve", "succeed"} <= set(actions)
