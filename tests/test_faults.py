"""Fault tests with real processes: `kill -9` of a service process mid-stream (and mid-background-stream,
followed from another process), a Postgres restart under
concurrent streamed turns, and SIGTERM. Afterwards every response id a client saw in `response.created`
is retrievable with a terminal status, and no conversation stays locked 30 s after its holder died.

The service runs as `convstate serve` processes with a short lease (3 s) and reaper interval (1 s), so
recovery takes seconds; every wait is bounded."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.harness import Process, start_service
from service.serving import ServerThread
from service.store.migrate import upgrade
from tests.pg import ThrowawayCluster
from tests.sse import sse_events

MODEL = "ref-chatml"
FAST_RECOVERY = {"turn_lease_seconds": 3, "reaper_interval": 1}
TERMINAL = ("completed", "incomplete", "failed", "cancelled")
LOCK_RECLAIMED_WITHIN = 30.0


class StreamedTurn:
    """One streamed turn driven from its own thread, as a client would: the id it was announced under
    and every event it saw, until the stream ends or the connection breaks."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.response_id: str | None = None
        self.kinds: list[str] = []
        self.status_code: int | None = None
        self.announced = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        try:
            with (
                httpx.Client(base_url=url, timeout=60) as http,
                http.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply,
            ):
                self.status_code = reply.status_code
                if reply.status_code != 200:
                    return
                for kind, event in sse_events(reply):
                    self.kinds.append(kind)
                    if kind == "response.created":
                        self.response_id = event["response"]["id"]
                        self.announced.set()
        except httpx.TransportError:
            pass  # the connection broke: the process died
        finally:
            self.announced.set()

    def join(self) -> None:
        self._thread.join(timeout=90)
        assert not self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """The stream's last events are a terminal one (after `error`, for a failure)."""
        if self.kinds[-1:] == ["response.failed"]:
            return self.kinds[-2:-1] == ["error"]
        return self.kinds[-1:] in (["response.completed"], ["response.incomplete"])


@pytest.fixture
def slow_streams(backend_admin: httpx.Client) -> Iterator[None]:
    """Streams long enough (a few seconds) to be caught mid-way."""
    backend_admin.post("/admin/stream", json={"chunk_delay_ms": 150}).raise_for_status()
    try:
        yield
    finally:
        backend_admin.post("/admin/stream", json={}).raise_for_status()


def _terminal_status(url: str, response_id: str, timeout: float = 30.0) -> str:
    """Poll until the response has a terminal status; errors on the way (a database coming back) are
    retried."""
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            try:
                reply = http.get(f"/v1/responses/{response_id}")
                last = reply.status_code
                if reply.status_code == 200 and reply.json()["status"] in TERMINAL:
                    status: str = reply.json()["status"]
                    return status
                last = reply.json().get("status", last)
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.2)
    raise AssertionError(f"{response_id} has no terminal status after {timeout}s (last: {last})")


def _turn_goes_through(url: str, conversation_id: str, since: float) -> float:
    """Seconds from `since` until a new turn on the conversation is accepted and completes."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() - since < LOCK_RECLAIMED_WITHIN + 5:
            try:
                reply = http.post(
                    "/v1/responses", json={"model": MODEL, "conversation": conversation_id, "input": "again"}
                )
                if reply.status_code == 200 and reply.json()["status"] == "completed":
                    return time.monotonic() - since
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    raise AssertionError(
        f"{conversation_id} still refuses turns {LOCK_RECLAIMED_WITHIN}s after its holder died"
    )


def _serve(database_url: str, backend_url: str, **settings: object) -> Process:
    """`convstate serve` in its own process, ready. Without API keys (on loopback): these faults are about
    turns and locks, and a client of a killed process has no key cache to lose."""
    return start_service(database_url, backend_url, "cache_ref", auth="none", **settings)


class Stopping:
    """SIGTERM sent to a service process, whose exit status arrives later (it drains meanwhile)."""

    def __init__(self, process: Process) -> None:
        self.status: list[int] = []
        self._thread = threading.Thread(target=lambda: self.status.append(process.signal(signal.SIGTERM)))
        self._thread.start()

    def exit_status(self) -> int:
        self._thread.join(timeout=60)
        (status,) = self.status
        return status


def _http(process: Process) -> httpx.Client:
    return httpx.Client(base_url=process.url, timeout=30)


def _conversations(url: str, count: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as http:
        return [http.post("/v1/conversations", json={}).json()["id"] for _ in range(count)]


def _bodies(conversation_ids: list[str], plain: int) -> list[dict[str, Any]]:
    return [{"model": MODEL, "input": f"tell me a long story, number {i}"} for i in range(plain)] + [
        {"model": MODEL, "conversation": conversation_id, "input": "tell me a long story"}
        for conversation_id in conversation_ids
    ]


def test_kill_9_mid_stream(
    migrated_urls: dict[str, str], reference_backend: ServerThread, slow_streams: None
) -> None:
    database_url = migrated_urls["postgres"]
    with _serve(database_url, reference_backend.url, **FAST_RECOVERY) as doomed:
        conversation_ids = _conversations(doomed.url, 2)
        turns = [StreamedTurn(doomed.url, body) for body in _bodies(conversation_ids, 2)]
        for turn in turns:
            assert turn.announced.wait(30) and turn.response_id, turn.status_code
        doomed.signal(signal.SIGKILL)  # no handler runs, nothing is cleaned up
        died = time.monotonic()
    for turn in turns:
        turn.join()
        assert not turn.ended  # the connection went with the process
    with _serve(database_url, reference_backend.url, **FAST_RECOVERY) as survivor, _http(survivor) as http:
        for turn in turns:
            assert turn.response_id is not None
            assert _terminal_status(survivor.url, turn.response_id) == "failed"
        for conversation_id in conversation_ids:
            assert _turn_goes_through(survivor.url, conversation_id, died) < LOCK_RECLAIMED_WITHIN
            items = http.get(f"/v1/conversations/{conversation_id}/items?order=asc").json()
            # The dead turn appended nothing; the next one did.
            assert [item["role"] for item in items["data"]] == ["user", "assistant"]


def test_kill_9_mid_background_stream_is_followed_to_its_end(
    migrated_urls: dict[str, str], reference_backend: ServerThread, slow_streams: None
) -> None:
    """A background stream followed from another replica when the process running it dies: the follower
    gets every event the dead process recorded, then a terminal event made once the reaper failed it."""
    database_url = migrated_urls["postgres"]
    with _serve(database_url, reference_backend.url, **FAST_RECOVERY) as survivor:
        with _serve(database_url, reference_backend.url, **FAST_RECOVERY) as doomed:
            turn = StreamedTurn(doomed.url, {"model": MODEL, "input": "a long story", "background": True})
            assert turn.announced.wait(30) and turn.response_id, turn.status_code
            deadline = time.monotonic() + 30
            while "response.output_text.delta" not in turn.kinds:
                assert time.monotonic() < deadline, turn.kinds
                time.sleep(0.05)
            followed: list[dict[str, Any]] = []

            def follow() -> None:
                with (
                    _http(survivor) as http,
                    http.stream("GET", f"/v1/responses/{turn.response_id}?stream=true") as reply,
                ):
                    followed.extend(event for _, event in sse_events(reply))

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            doomed.signal(signal.SIGKILL)
        follower.join(timeout=60)
        assert not follower.is_alive()
    assert [event["sequence_number"] for event in followed] == list(range(len(followed)))
    assert followed[-1]["type"] == "response.failed" and followed[-1]["response"]["status"] == "failed"
    assert "response.output_text.delta" in [event["type"] for event in followed]


def test_postgres_restart_under_concurrent_streams(
    reference_backend: ServerThread, slow_streams: None
) -> None:
    cluster = ThrowawayCluster(crash_safe=True)
    database_url = cluster.start()
    try:
        upgrade(database_url)
        with _serve(database_url, reference_backend.url, **FAST_RECOVERY) as service:
            conversation_ids = _conversations(service.url, 2)
            turns = [StreamedTurn(service.url, body) for body in _bodies(conversation_ids, 4)]
            for turn in turns:
                assert turn.announced.wait(30) and turn.response_id, turn.status_code
            cluster.stop_server()
            restarted = time.monotonic()
            time.sleep(1.0)
            cluster.start_server()
            for turn in turns:
                turn.join()
                # Every client got a terminal event: the connection stayed up.
                assert turn.ended, turn.kinds[-3:]
            for turn in turns:
                assert turn.response_id is not None
                _terminal_status(service.url, turn.response_id)
            for conversation_id in conversation_ids:
                assert _turn_goes_through(service.url, conversation_id, restarted) < LOCK_RECLAIMED_WITHIN
            # And the service is whole again.
            fresh = StreamedTurn(service.url, {"model": MODEL, "input": "are you back?"})
            fresh.join()
            assert fresh.kinds[-1] == "response.completed"
    finally:
        cluster.stop()


def test_sigterm_lets_running_turns_finish_and_refuses_new_ones(
    migrated_urls: dict[str, str], reference_backend: ServerThread, slow_streams: None
) -> None:
    with _serve(
        migrated_urls["postgres"], reference_backend.url, **FAST_RECOVERY, shutdown_grace_seconds=30
    ) as service:
        turn = StreamedTurn(service.url, {"model": MODEL, "input": "finish this, please"})
        assert turn.announced.wait(30) and turn.response_id
        stopping = Stopping(service)
        with _http(service) as http:
            deadline = time.monotonic() + 10
            while http.get("/readyz").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert http.get("/readyz").status_code == 503
            refused = http.post("/v1/responses", json={"model": MODEL, "input": "one more?"})
        assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["type"] == "server_error"
        turn.join()
        assert turn.kinds[-1] == "response.completed"
        assert stopping.exit_status() == -signal.SIGTERM  # drained, then ended by the signal
    with _serve(migrated_urls["postgres"], reference_backend.url) as other:
        assert turn.response_id is not None
        assert _terminal_status(other.url, turn.response_id) == "completed"


def test_sigterm_fails_what_outlives_the_grace_period(
    migrated_urls: dict[str, str], reference_backend: ServerThread, backend_admin: httpx.Client
) -> None:
    backend_admin.post("/admin/stream", json={"chunk_delay_ms": 1500}).raise_for_status()
    backend_admin.post("/admin/latency", json={"ms": 2000}).raise_for_status()
    try:
        with _serve(
            migrated_urls["postgres"], reference_backend.url, **FAST_RECOVERY, shutdown_grace_seconds=1
        ) as service:
            turn = StreamedTurn(service.url, {"model": MODEL, "input": "a story that will not end in time"})
            assert turn.announced.wait(30) and turn.response_id
            whole: list[httpx.Response] = []
            answering = threading.Thread(
                target=lambda: whole.append(
                    httpx.post(
                        f"{service.url}/v1/responses", json={"model": MODEL, "input": "now"}, timeout=30
                    )
                )
            )
            answering.start()
            queued = httpx.post(
                f"{service.url}/v1/responses",
                json={"model": MODEL, "input": "later", "background": True},
                timeout=30,
            )
            assert queued.json()["status"] == "queued"
            stopping = Stopping(service)  # the other two turns are still waiting on the backend
            turn.join()
            answering.join(timeout=30)
            assert turn.ended and turn.kinds[-1] == "response.failed"
            assert stopping.exit_status() == -signal.SIGTERM  # drained, then ended by the signal
    finally:
        backend_admin.post("/admin/latency", json={"ms": 0}).raise_for_status()
        backend_admin.post("/admin/stream", json={}).raise_for_status()
    # The turn answered whole was told to retry, not dropped.
    (cut,) = whole
    assert cut.status_code == 503 and cut.headers["retry-after"].isdigit()
    assert cut.json()["error"]["message"].startswith("The service shut down")
    with _serve(migrated_urls["postgres"], reference_backend.url) as other, _http(other) as http:
        for response_id in (turn.response_id, queued.json()["id"]):
            stored = http.get(f"/v1/responses/{response_id}").json()
            assert stored["status"] == "failed"
            assert stored["error"]["message"].startswith("The service shut down")
