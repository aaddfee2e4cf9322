"""``farmhand keys``: generate, list and revoke through the installed command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

FARMHAND = str(Path(sys.executable).with_name("farmhand"))


def run(home: Path, *args: str, actor: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    if actor:
        env["FARMHAND_ACTOR"] = actor
    return subprocess.run(
        [FARMHAND, "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def as_json(home: Path, *args: str) -> Any:
    done = run(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def fails(home: Path, code: int, *args: str) -> str:
    done = run(home, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("farmhand: error: ")
    assert done.stderr.count("\n") == 1
    return done.stderr


def test_generate_list_revoke(tmp_path: Path) -> None:
    assert as_json(tmp_path, "list") == []

    first = as_json(tmp_path, "generate")
    assert first["owner"] == "coordinator"
    assert first["role"] == "coordinator"
    assert first["key_id"].startswith("coordinator-")
    assert first["revoked_at"] is None
    private = Path(first["private_key"])
    assert private == tmp_path / "keys" / "private" / f"{first['key_id']}.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700

    alice = as_json(tmp_path, "generate", "--owner", "alice", "--role", "approver")
    assert (alice["owner"], alice["role"]) == ("alice", "approver")

    listed = as_json(tmp_path, "list")
    assert [k["key_id"] for k in listed] == [first["key_id"], alice["key_id"]]
    assert all(k["private"] for k in listed)
    for field in ("key_id", "owner", "role", "public_key", "created_at", "revoked_at"):
        assert field in listed[0]

    revoked = as_json(tmp_path, "revoke", first["key_id"], "--reason", "rotated", "--as", "bob")
    assert revoked["key_id"] == first["key_id"]
    assert revoked["revoked_by"] == "bob"
    assert revoked["revoke_reason"] == "rotated"
    assert revoked["revoked_at"].endswith("Z")

    listed = as_json(tmp_path, "list")
    assert [k["revoked_by"] for k in listed] == ["bob", None]

    # revoking again is harmless: the first revocation stands, and a note says so
    done = run(tmp_path, "revoke", first["key_id"], "--reason", "again", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revoked_by"] == "bob"
    assert "already revoked" in done.stderr


def test_human_output(tmp_path: Path) -> None:
    done = run(tmp_path, "list")
    assert done.returncode == 0
    assert "farmhand keys generate" in done.stdout

    done = run(tmp_path, "generate")
    assert done.returncode == 0, done.stderr
    key_id = done.stdout.strip()  # just the key id on stdout, for scripts
    assert key_id.startswith("coordinator-")
    assert "public" in done.stderr

    done = run(tmp_path, "revoke", key_id, actor="carol")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"revoked {key_id} (coordinator): ")
    assert "by carol" in done.stdout

    done = run(tmp_path, "list")
    assert done.returncode == 0, done.stderr
    for column in ("key id", "owner", "role", "created", "revoked"):
        assert column in done.stdout


def test_errors_and_exit_codes(tmp_path: Path) -> None:
    assert "no key coordinator-00000000" in fails(tmp_path, 4, "revoke", "coordinator-00000000")
    assert "is not a key id" in fails(tmp_path, 2, "revoke", "../../etc/passwd")
    assert "is not a valid name" in fails(tmp_path, 2, "generate", "--owner", "bad name")
    assert "is not one of" in fails(tmp_path, 2, "generate", "--role", "admin")
    fails(tmp_path, 2, "revoke")  # missing argument: a usage error
    assert not (tmp_path / "keys" / "public").exists() or not any(
        (tmp_path / "keys" / "public").iterdir()
    )


def test_damaged_keyring_is_one_line_error(tmp_path: Path) -> None:
    key_id = as_json(tmp_path, "generate")["key_id"]
    (tmp_path / "keys" / "public" / f"{key_id}.json").write_text("{")
    assert "is damaged" in fails(tmp_path, 1, "list")


def test_help_lists_the_commands(tmp_path: Path) -> None:
    done = run(tmp_path, "--help")
    assert done.returncode == 0
    for command in ("generate", "list", "revoke"):
        assert command in done.stdout
