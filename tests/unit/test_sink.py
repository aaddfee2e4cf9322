"""The loopback webhook sink's own behaviour: effects, repeats, failure paths and its log."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from farmhand.testing.sink import SinkCall, WebhookSink, load_log


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    with WebhookSink() as running:
        yield running


@pytest.fixture
def client(sink: WebhookSink) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sink.url, timeout=10.0) as http:
        yield http


def post(client: httpx.Client, path: str, key: str | None, body: object = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(path, json=body, headers=headers)


def test_url_is_loopback_with_bound_port(sink: WebhookSink) -> None:
    assert sink.url.startswith("http://127.0.0.1:")
    assert int(sink.url.rsplit(":", 1)[1]) > 0


def test_url_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = WebhookSink().url


def test_first_call_is_the_effect(sink: WebhookSink, client: httpx.Client) -> None:
    response = post(client, "/ok", "k-1", {"n": 1})
    assert response.status_code == 201
    data = response.json()
    assert data["id"].startswith("eff-")
    assert data["url"] == f"{sink.url}/effects/{data['id']}"
    (call,) = sink.calls()
    assert call == SinkCall(
        key="k-1",
        method="POST",
        path="/ok",
        body={"n": 1},
        at=call.at,
        status=201,
        effect=True,
        repeat=False,
    )
    assert sink.effects() == {"k-1": call}
    assert sink.repeated_calls() == 0


def test_repeat_gets_the_same_answer_and_no_new_effect(
    sink: WebhookSink, client: httpx.Client
) -> None:
    first = post(client, "/ok", "k-1", {"n": 1})
    again = post(client, "/ok", "k-1", {"n": 1})
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(sink.effects()) == 1
    assert sink.repeated_calls() == 1
    assert [(c.effect, c.repeat) for c in sink.calls()] == [(True, False), (False, True)]


def test_repeat_is_replayed_whatever_the_path(sink: WebhookSink, client: httpx.Client) -> None:
    first = post(client, "/ok", "k-1")
    for path in ("/fail", "/reject", "/ratelimit", "/flaky?fail_times=3", "/slow?ms=bad"):
        again = post(client, path, "k-1")
        assert (again.status_code, again.content) == (201, first.content)
    assert sink.repeated_calls() == 5
    assert len(sink.effects()) == 1


def test_distinct_keys_get_distinct_effects(sink: WebhookSink, client: httpx.Client) -> None:
    ids = {post(client, "/ok", f"k-{i}").json()["id"] for i in range(5)}
    assert len(ids) == 5
    assert set(sink.effects()) == {f"k-{i}" for i in range(5)}


def test_unknown_path_is_an_effect(sink: WebhookSink, client: httpx.Client) -> None:
    assert post(client, "/hooks/orders?x=1", "k-1").status_code == 201
    assert sink.effects()["k-1"].path == "/hooks/orders?x=1"


@pytest.mark.parametrize(
    ("path", "status"), [("/fail", 500), ("/reject", 400), ("/ratelimit", 429)]
)
def test_failure_paths_make_no_effect(
    sink: WebhookSink, client: httpx.Client, path: str, status: int
) -> None:
    for _ in range(2):
        response = post(client, path, "k-1")
        assert response.status_code == status
        assert "error" in response.json()
    assert sink.effects() == {}
    assert sink.repeated_calls() == 0
    # the key is not used up: the next successful call is its effect
    assert post(client, "/ok", "k-1").status_code == 201
    assert set(sink.effects()) == {"k-1"}


def test_ratelimit_sends_retry_after(client: httpx.Client) -> None:
    assert post(client, "/ratelimit?retry_after=7", "k-1").headers["Retry-After"] == "7"
    assert post(client, "/ratelimit", "k-2").headers["Retry-After"] == "1"


def test_flaky_fails_the_first_calls_of_each_key(sink: WebhookSink, client: httpx.Client) -> None:
    statuses = [post(client, "/flaky?fail_times=2", "k-1").status_code for _ in range(4)]
    assert statuses == [503, 503, 201, 201]
    assert post(client, "/flaky?fail_times=2", "k-2").status_code == 503
    assert set(sink.effects()) == {"k-1"}
    assert sink.repeated_calls() == 1


def test_flaky_with_zero_failures_is_an_effect(client: httpx.Client) -> None:
    assert post(client, "/flaky?fail_times=0", "k-1").status_code == 201


def test_slow_waits_then_makes_the_effect(sink: WebhookSink, client: httpx.Client) -> None:
    started = time.monotonic()
    response = post(client, "/slow?ms=200", "k-1")
    assert time.monotonic() - started >= 0.2
    assert response.status_code == 201
    assert set(sink.effects()) == {"k-1"}


def test_bad_query_parameter_is_rejected(sink: WebhookSink, client: httpx.Client) -> None:
    response = post(client, "/slow?ms=soon", "k-1")
    assert response.status_code == 400
    assert "ms" in response.json()["error"]
    assert sink.effects() == {}


def test_calls_without_a_key_are_each_an_effect(sink: WebhookSink, client: httpx.Client) -> None:
    first = post(client, "/ok", None)
    second = post(client, "/ok", None)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]
    assert [(c.key, c.effect, c.repeat) for c in sink.calls()] == [
        (None, True, False),
        (None, True, False),
    ]
    assert sink.effects() == {}


def test_get_effect_document(sink: WebhookSink, client: httpx.Client) -> None:
    receipt = post(client, "/ok", "k-1", {"order": 42}).json()
    response = client.get(f"/effects/{receipt['id']}")
    assert response.status_code == 200
    document = response.json()
    assert document["id"] == receipt["id"]
    assert document["url"] == receipt["url"]
    assert document["key"] == "k-1"
    assert document["body"] == {"order": 42}
    assert client.get("/effects/eff-999999").status_code == 404
    # lookups are recorded but are neither effects nor repeats
    assert [(c.method, c.effect, c.repeat) for c in sink.calls()] == [
        ("POST", True, False),
        ("GET", False, False),
        ("GET", False, False),
    ]


def test_bodies_are_recorded_as_json_text_or_none(sink: WebhookSink, client: httpx.Client) -> None:
    client.post("/ok", content=b"not json", headers={"Idempotency-Key": "a"})
    client.put("/ok", headers={"Idempotency-Key": "b"})
    client.patch("/ok", json=[1, 2], headers={"Idempotency-Key": "c"})
    client.delete("/ok", headers={"Idempotency-Key": "d"})
    assert [(c.method, c.body) for c in sink.calls()] == [
        ("POST", "not json"),
        ("PUT", None),
        ("PATCH", [1, 2]),
        ("DELETE", None),
    ]


def test_utf8_key_is_decoded(sink: WebhookSink) -> None:
    host, port = sink.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", "/ok")
        conn.putheader("Idempotency-Key", "café".encode())
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        assert conn.getresponse().read()
    finally:
        conn.close()
    assert set(sink.effects()) == {"café"}


def test_keep_alive_and_chunked_bodies(sink: WebhookSink) -> None:
    host, port = sink.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/ok", body=b'{"a":1}', headers={"Idempotency-Key": "k-1"})
        first = conn.getresponse()
        assert first.status == 201
        first.read()
        sock = conn.sock
        assert sock is not None
        chunks = iter([b'{"b":', b"2}"])
        conn.request(
            "POST", "/ok", body=chunks, headers={"Idempotency-Key": "k-2"}, encode_chunked=True
        )
        second = conn.getresponse()
        assert second.status == 201
        second.read()
        assert conn.sock is sock  # the same connection served both requests
    finally:
        conn.close()
    assert [c.body for c in sink.calls()] == [{"a": 1}, {"b": 2}]


def test_concurrent_calls_with_one_key_make_one_effect(sink: WebhookSink) -> None:
    answers: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=10.0) as http:
            response = http.post(f"{sink.url}/slow?ms=20", headers={"Idempotency-Key": "same"})
        with lock:
            answers.append(response.content)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(answers)) == 1
    assert len(sink.effects()) == 1
    assert sink.repeated_calls() == 9
    assert len(sink.calls()) == 10


def test_wait_for_calls(sink: WebhookSink, client: httpx.Client) -> None:
    assert not sink.wait_for_calls(1, timeout=0.05)
    timer = threading.Timer(0.05, lambda: post(client, "/ok", "k-1"))
    timer.start()
    try:
        assert sink.wait_for_calls(1, timeout=5.0)
    finally:
        timer.join()


def test_calls_are_in_arrival_order(sink: WebhookSink) -> None:
    def slow() -> None:
        with httpx.Client(timeout=10.0) as http:
            http.post(f"{sink.url}/slow?ms=300", headers={"Idempotency-Key": "slow"})

    thread = threading.Thread(target=slow)
    thread.start()
    assert _eventually(lambda: sink._arrivals >= 1)
    with httpx.Client(timeout=10.0) as http:
        http.post(f"{sink.url}/ok", headers={"Idempotency-Key": "fast"})
    thread.join()
    assert [c.key for c in sink.calls()] == ["slow", "fast"]


def test_stop_is_prompt_with_a_slow_call_in_flight() -> None:
    sink = WebhookSink().start()
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            with httpx.Client(timeout=30.0) as http:
                http.post(f"{sink.url}/slow?ms=20000", headers={"Idempotency-Key": "k"})
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    assert _eventually(lambda: bool(sink._connections))
    started = time.monotonic()
    sink.stop()
    sink.stop()  # idempotent
    assert time.monotonic() - started < 3.0
    thread.join(5.0)
    assert not thread.is_alive()
    assert sink.effects() == {}


def test_log_round_trip(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    with WebhookSink(log_path=log) as sink, httpx.Client(base_url=sink.url) as http:
        post(http, "/ok", "k-1", {"n": 1})
        post(http, "/ok", "k-1", {"n": 1})
        post(http, "/fail", "k-2")
        post(http, "/ok", None, "text")
        # each line is flushed as soon as the call is answered
        assert len(load_log(log)) == 4
        expected = sink.calls()
    assert load_log(log) == expected
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4]


def test_log_appends_and_skips_a_partial_last_line(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    for _ in range(2):
        with WebhookSink(log_path=log) as sink, httpx.Client(base_url=sink.url) as http:
            post(http, "/ok", "k-1")
    with log.open("a") as handle:
        handle.write('{"seq": 3, "key": "half')
    calls = load_log(log)
    assert [c.effect for c in calls] == [True, True]


def test_load_log_rejects_garbage_in_the_middle(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    log.write_text("garbage\n{}\n")
    with pytest.raises(ValueError, match=r"calls\.jsonl:1"):
        load_log(log)


def test_module_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "farmhand.testing.sink", "--port", str(port), "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10.0) as http:
            assert post(http, "/ok", "k-1").status_code == 201
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert stderr == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    (call,) = load_log(log)
    assert (call.key, call.effect) == ("k-1", True)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False
