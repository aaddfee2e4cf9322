"""A third-party connector package, as docs/connectors/plugins.md writes it, installed into a
temporary directory on the import path: the registry finds it through its entry point and
an executor runs an intent of its kind against a real loopback HTTP server."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from farmhand.clock import FakeClock
from farmhand.config import Settings
from farmhand.connectors import Connector, _plugins, connector_class, known_kinds
from farmhand.contracts import IntentState
from farmhand.coordinator import Coordinator, SubmitRequest
from farmhand.errors import InvalidInput, UnknownKind
from farmhand.executor import Executor
from farmhand.secrets import SecretStore
from farmhand.store import Store
from farmhand.testing.sink import WebhookSink
from homes import prepare_home

DOC = Path(__file__).resolve().parents[2] / "docs" / "connectors" / "plugins.md"
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def documented(language: str, marker: str) -> str:
    """The code block of ``language`` in the plugin guide that contains ``marker``."""
    blocks = [text for lang, text in _BLOCK.findall(DOC.read_text()) if lang == language]
    (block,) = [text for text in blocks if marker in text]
    return block


def install(site: Path) -> str:
    """Install the documented package into ``site`` the way pip lays it out: the module,
    and a ``.dist-info`` with METADATA and entry_points.txt from its pyproject. Returns the
    distribution name."""
    project = tomllib.loads(documented("toml", "[project]"))["project"]
    site.mkdir(parents=True, exist_ok=True)
    (site / "acme_farmhand.py").write_text(documented("python", "class PingConnector"))
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return str(name)


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The documented package installed in a temporary directory on sys.path; the
    registry's entry-point cache is cleared before and after."""
    site = tmp_path / "site"
    install(site)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    _plugins.cache_clear()
    yield site
    _plugins.cache_clear()
    sys.modules.pop("acme_farmhand", None)


def test_the_entry_point_loads_the_class(plugin_site: Path) -> None:
    assert "acme.ping" in known_kinds()
    cls = connector_class("acme.ping")
    assert issubclass(cls, Connector)
    assert cls.__name__ == "PingConnector"
    assert cls.__module__ == "acme_farmhand"
    assert cls.kind == "acme.ping"
    assert Path(sys.modules["acme_farmhand"].__file__ or "").parent == plugin_site


def test_without_the_package_the_kind_is_unknown() -> None:
    _plugins.cache_clear()
    assert "acme.ping" not in known_kinds()
    with pytest.raises(UnknownKind, match=r"unknown kind 'acme\.ping'"):
        connector_class("acme.ping")


def test_a_plugin_cannot_replace_a_builtin_kind(plugin_site: Path) -> None:
    info = next(plugin_site.glob("*.dist-info"))
    with (info / "entry_points.txt").open("a") as entry_points:
        entry_points.write('"webhook.post" = acme_farmhand:PingConnector\n')
        entry_points.write("acme.broken = acme_farmhand:PingPayload\n")
    _plugins.cache_clear()
    assert connector_class("webhook.post").__module__ == "farmhand.connectors.webhook"
    with pytest.raises(UnknownKind, match="is not a farmhand Connector"):
        connector_class("acme.broken")


async def test_an_executor_runs_an_intent_of_the_plugin_kind(
    plugin_site: Path,
    store: Store,
    settings: Settings,
    clock: FakeClock,
    coordinator: Coordinator,
) -> None:
    with WebhookSink() as sink:
        url = f"{sink.url}/ok"
        request = SubmitRequest(kind="acme.ping", key="ping-1", payload={"url": url})
        submitted = await coordinator.submit(request)
        with pytest.raises(InvalidInput, match=r"acme\.ping payload"):
            await coordinator.submit(
                SubmitRequest(kind="acme.ping", key="ping-2", payload={"url": "nope"})
            )
        executor = Executor(store, settings, drain=True, clock=clock, secrets=SecretStore.empty())
        stats = await executor.run()
        assert (stats.calls, stats.succeeded) == (1, 1)
        done = await store.get_intent(submitted.status.id)
        assert done is not None
        assert done.state is IntentState.SUCCEEDED
        (receipt,) = done.receipts
        assert receipt.url == url
        assert receipt.detail == {"status": 201}
        (call,) = sink.calls()
        assert (call.method, call.path) == ("GET", "/ok")


def test_farmhand_schema_shows_the_plugin_payload(plugin_site: Path, tmp_path: Path) -> None:
    home = prepare_home(tmp_path / "home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMHAND_")}
    env["FARMHAND_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_site), env.get("PYTHONPATH")]))
    farmhand = str(Path(sys.executable).with_name("farmhand"))
    done = subprocess.run(
        [farmhand, "schema", "acme.ping"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema["title"] == "PingPayload"
    assert schema["required"] == ["url"]
