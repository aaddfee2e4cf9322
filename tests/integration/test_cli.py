"""The CLI contract that scripts rely on: JSON shapes, exit codes, schemas, the demo.

Every test runs the installed ``farmhand`` command in a subprocess on a real SQLite file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from homes import prepare_home

FARMHAND = str(Path(sys.executable).with_name("farmhand"))


@pytest.fixture(autouse=True)
def _policy_and_key(tmp_path: Path) -> None:
    """Tests use tmp_path as FARMHAND_HOME: give it what `farmhand init` would."""
    prepare_home(tmp_path)


def run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    return subprocess.run(
        [FARMHAND, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def ok(home: Path, *args: str, stdin: str | None = None) -> str:
    done = run(home, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def as_json(home: Path, *args: str) -> Any:
    return json.loads(ok(home, *args, "--json"))


def test_version(tmp_path: Path) -> None:
    assert ok(tmp_path, "--version").startswith("farmhand ")


def test_status_list_receipts_shapes(tmp_path: Path) -> None:
    intent_id = ok(tmp_path, "submit", "noop", "--key", "k-1", "--payload", "{}").strip()
    pending = as_json(tmp_path, "status", intent_id)
    for field in ("id", "key", "kind", "account", "state", "attempts", "created_at"):
        assert field in pending
    assert pending["payload_hash"].startswith("sha256:")
    assert pending["state"] == "pending"
    assert pending["receipts"] == []

    ok(tmp_path, "executor", "run", "--drain")

    done = as_json(tmp_path, "status", "k-1")  # by key as well as by id
    assert done["id"] == intent_id
    assert done["state"] == "succeeded"
    assert done["attempts"] == 1
    assert len(done["receipts"]) == 1

    listed = as_json(tmp_path, "list", "--state", "succeeded")
    assert [item["id"] for item in listed] == [intent_id]
    assert as_json(tmp_path, "list", "--state", "pending") == []

    receipts = as_json(tmp_path, "receipts", "--intent", intent_id)
    assert len(receipts) == 1
    receipt = receipts[0]
    for field in ("intent_id", "attempt", "outcome", "external_id", "url", "error", "finished_at"):
        assert field in receipt
    assert receipt["outcome"] == "succeeded"
    assert receipt["external_id"] == f"noop-{intent_id}"


def test_submit_json_and_idempotent_repeat(tmp_path: Path) -> None:
    first = as_json(tmp_path, "submit", "noop", "--key", "same", "--payload", '{"a": 1}')
    again = run(tmp_path, "submit", "noop", "--key", "same", "--payload", '{"a": 1}', "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["id"] == first["id"]
    assert "already submitted" in again.stderr


def test_payload_from_file(tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text('{"delay_ms": 1}')
    status = as_json(tmp_path, "submit", "noop", "--key", "f", "--payload", f"@{payload}")
    assert status["payload"] == {"delay_ms": 1}


def test_batch_prints_ids_in_order(tmp_path: Path) -> None:
    lines = "\n".join(
        json.dumps({"kind": "noop", "key": f"b-{i}", "payload": {"i": i}}) for i in range(5)
    )
    ids = ok(tmp_path, "submit", "--batch", "-", stdin=lines).split()
    assert len(ids) == 5
    for i, intent_id in enumerate(ids):
        assert as_json(tmp_path, "status", intent_id)["key"] == f"b-{i}"


def test_cancel_and_wrong_state(tmp_path: Path) -> None:
    ok(tmp_path, "submit", "noop", "--key", "c", "--payload", "{}")
    assert as_json(tmp_path, "cancel", "c", "--reason", "changed my mind")["state"] == "cancelled"
    again = run(tmp_path, "cancel", "c")
    assert again.returncode == 6
    assert again.stderr.startswith("farmhand: error:")
    missing = run(tmp_path, "status", "no-such-intent")
    assert missing.returncode == 4
    events = as_json(tmp_path, "audit", "--intent", "c")
    cancel = next(e for e in events if e["action"] == "cancel")
    assert cancel["reason"] == "changed my mind"
    assert (cancel["from_state"], cancel["to_state"]) == ("pending", "cancelled")


def test_dead_letter_and_requeue(tmp_path: Path) -> None:
    ok(
        tmp_path,
        "submit",
        "noop",
        "--key",
        "doomed",
        "--payload",
        '{"fail": "permanent"}',
    )
    ok(tmp_path, "executor", "run", "--drain")
    dead = as_json(tmp_path, "dlq", "list")
    assert [d["key"] for d in dead] == ["doomed"]
    assert dead[0]["receipts"][0]["outcome"] == "failed"
    assert dead[0]["reason"].startswith("permanent failure")
    requeued = as_json(tmp_path, "dlq", "retry", "doomed")
    assert requeued[0]["state"] == "pending"


def test_gate_status_json(tmp_path: Path) -> None:
    assert as_json(tmp_path, "gate", "status")["open"] is True
    ok(tmp_path, "gate", "off", "--reason", "maintenance", "--as", "alice")
    status = as_json(tmp_path, "gate", "status")
    assert status["open"] is False
    assert status["closed"][0]["actor"] == "alice"
    assert status["closed"][0]["reason"] == "maintenance"
    ok(tmp_path, "gate", "on", "--as", "alice")
    assert as_json(tmp_path, "gate", "status")["open"] is True


def test_schema(tmp_path: Path) -> None:
    names = json.loads(ok(tmp_path, "schema", "--list"))
    assert {"intent", "receipt", "attempt", "lease", "audit_event", "gate"} <= set(names)
    intent = json.loads(ok(tmp_path, "schema", "intent"))
    assert intent["type"] == "object"
    assert {"id", "key", "kind", "payload", "payload_hash"} <= set(intent["required"])
    unknown = run(tmp_path, "schema", "nope")
    assert unknown.returncode == 2
    assert "known:" in unknown.stderr


def test_init_writes_config_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok(home, "init")
    config = home / "farmhand.toml"
    assert "honours_idempotency_key" in config.read_text()
    config.write_text("# mine\n")
    ok(home, "init")
    assert config.read_text() == "# mine\n"


@pytest.mark.timeout(60)
def test_demo_runs_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(tmp_path)
    with subprocess.Popen(
        [FARMHAND, "up", "--demo"],
        env=env,
        stdin=subprocess.PIPE,  # not a TTY: the demo keeps running until Ctrl-C
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as demo:
        deadline = time.monotonic() + 40
        settled = False
        while time.monotonic() < deadline and not settled:
            time.sleep(0.2)
            listed = run(tmp_path, "list", "--json")
            if listed.returncode == 0:
                states = [i["state"] for i in json.loads(listed.stdout)]
                settled = len(states) == 6 and all(s in ("succeeded", "dead") for s in states)
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=20)
    assert settled, err
    assert demo.returncode == 0, err
    assert "same key and payload: same intent" in out
    intents = as_json(tmp_path, "list")
    assert sorted(i["state"] for i in intents).count("dead") == 1
    assert sorted(i["state"] for i in intents).count("succeeded") == 5


def test_no_policy_no_executor_and_no_key_no_submit(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    refused = run(bare, "executor", "run", "--drain")
    assert refused.returncode == 7
    assert refused.stderr.count("\n") == 1
    assert "declares no [agents]" in refused.stderr
    assert "farmhand init" in refused.stderr
    unsigned = run(bare, "submit", "noop", "--key", "k", "--payload", "{}")
    assert unsigned.returncode == 8
    assert "farmhand init" in unsigned.stderr
    # after init both work: the starter policy allows the local agent noop and webhooks
    ok(bare, "init")
    ok(bare, "submit", "noop", "--key", "k", "--payload", "{}")
    ok(bare, "executor", "run", "--drain")
    assert as_json(bare, "status", "k")["state"] == "succeeded"


@pytest.mark.parametrize(("call_timeout", "state"), [(0.5, "dead"), (5, "succeeded")])
def test_executor_call_timeout_from_the_config(
    tmp_path: Path, call_timeout: float, state: str
) -> None:
    prepare_home(tmp_path, f"[executor]\ncall_timeout = {call_timeout}\n")
    payload = json.dumps({"delay_ms": 1500})
    ok(tmp_path, "submit", "noop", "--key", "slow", "--payload", payload, "--max-attempts", "1")
    ok(tmp_path, "executor", "run", "--drain")
    intent = as_json(tmp_path, "status", "slow")
    assert intent["state"] == state, intent
    if state == "dead":
        assert intent["receipts"][0]["error"] == f"call exceeded {call_timeout:.1f}s"


def test_a_bad_call_timeout_is_one_line(tmp_path: Path) -> None:
    prepare_home(tmp_path, "[executor]\ncall_timeout = -1\n")
    done = run(tmp_path, "executor", "run", "--drain")
    assert done.returncode == 2, done.stderr
    assert "call_timeout must be a non-negative number" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
