"""Jobs enqueued inside a request inherit its request id and deadline: Celery
and arq, with real worker processes and the Redis at 127.0.0.1:6379.

The web side is a real ASGI service (ContextMiddleware on uvicorn) whose
handler enqueues the job; the worker logs through RequestContextFilter into
a file the test reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import RunningServer, serve

from ctxmiddleware import ContextMiddleware

pytestmark = pytest.mark.timeout(90)

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping())
    except Exception:
        return False


if not _redis_up():  # pragma: no cover
    pytest.skip("Redis not reachable at 127.0.0.1:6379", allow_module_level=True)


@contextlib.contextmanager
def _worker(cmd: list[str], env: dict[str, str], ready: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, cwd=str(TESTS), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            time.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _env(log: pathlib.Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env["CTXTEST_JOB_LOG"] = str(log)
    env.update(extra)
    return env


def _call(server: RunningServer, path: str, *headers: tuple[str, str]) -> dict[str, Any]:
    response = httpx.get(server.url + path, headers=list(headers), timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def _json(send: Any, data: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(data).encode()})


# -- Celery ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def celery_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("celery") / "jobs.log"
    log.touch()
    queue = f"ctxtest-{uuid.uuid4().hex[:8]}"
    os.environ["CTXTEST_CELERY_QUEUE"] = queue  # (for the import below)
    import celery_app

    celery_app.app.conf.task_default_queue = queue

    def ready() -> bool:
        with contextlib.suppress(Exception):
            return bool(celery_app.app.control.ping(timeout=0.5, destination=[f"w@{queue}"]))
        return False

    cmd = [
        sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo",
        "-Q", queue, "-n", f"w@{queue}", "--without-mingle", "--without-gossip",
        "-l", "warning",
    ]
    with _worker(cmd, _env(log, CTXTEST_CELERY_QUEUE=queue), ready):
        yield {"app": celery_app, "log": log}


@pytest.fixture(scope="module")
def celery_web(celery_env: dict[str, Any]) -> Iterator[RunningServer]:
    tasks = celery_env["app"]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        name = scope["path"].strip("/")
        if name == "mark":
            result = tasks.mark.apply_async(
                args=[query["path"]], countdown=float(query.get("countdown", 0))
            )
        else:
            result = getattr(tasks, name).delay()
        await _json(send, {"id": result.id})

    with serve(ContextMiddleware(app, timeout=30)) as running:
        yield running


def test_celery_job_gets_the_request_id_and_deadline(
    celery_env: dict[str, Any], celery_web: RunningServer
) -> None:
    rid = f"celery-{uuid.uuid4().hex[:8]}"
    sent = _call(celery_web, "/describe", ("x-request-id", rid), ("x-request-timeout-ms", "8000"))
    t_sent = time.time()
    result = celery_env["app"].app.AsyncResult(sent["id"]).get(timeout=30)
    assert result["request_id"] == rid
    # The job's deadline is the request's: 8 s from the request, less the time since.
    assert result["remaining"] is not None
    assert 0 < result["remaining"] <= 8.0 - (result["at"] - t_sent) + 0.05
    assert f"{rid} inside the celery job" in celery_env["log"].read_text()


def test_celery_job_without_a_budget_gets_the_middleware_timeout(
    celery_env: dict[str, Any], celery_web: RunningServer
) -> None:
    sent = _call(celery_web, "/describe")
    result = celery_env["app"].app.AsyncResult(sent["id"]).get(timeout=30)
    assert len(result["request_id"]) == 32  # the middleware's fresh id
    assert 20 < result["remaining"] <= 30


def test_celery_job_context_expires_at_the_request_deadline(
    celery_env: dict[str, Any], celery_web: RunningServer
) -> None:
    t0 = time.time()
    sent = _call(celery_web, "/wait_deadline", ("x-request-timeout-ms", "1500"))
    result = celery_env["app"].app.AsyncResult(sent["id"]).get(timeout=30)
    assert result["fired"] is True and result["err"] == "DeadlineExceeded"
    assert result["at"] - t0 <= 1.5 + 0.3


def test_celery_expired_job_is_not_run(
    celery_env: dict[str, Any], celery_web: RunningServer, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "ran"
    sent = _call(
        celery_web, f"/mark?path={marker}&countdown=1.5", ("x-request-timeout-ms", "300")
    )
    res = celery_env["app"].app.AsyncResult(sent["id"])
    deadline = time.monotonic() + 20
    while res.state not in ("REVOKED", "SUCCESS", "FAILURE") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert res.state == "REVOKED"
    assert not marker.exists()
    # The control: the same job with the middleware's 30 s runs.
    sent = _call(celery_web, f"/mark?path={marker}&countdown=0.2")
    assert celery_env["app"].app.AsyncResult(sent["id"]).get(timeout=30) is True
    assert marker.exists()


def test_celery_outside_a_request_is_untouched(celery_env: dict[str, Any]) -> None:
    result = celery_env["app"].describe.delay().get(timeout=30)
    assert result["request_id"] is None and result["remaining"] is None


# -- arq ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arq_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("arq") / "jobs.log"
    log.touch()
    queue = f"ctxtest:arq:{uuid.uuid4().hex[:8]}"
    health = f"{queue}:health-check"

    def ready() -> bool:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=12).exists(health))

    cmd = [sys.executable, "-m", "arq", "arq_app.WorkerSettings"]
    with _worker(cmd, _env(log, CTXTEST_ARQ_QUEUE=queue), ready):
        yield {"log": log, "queue": queue}


@pytest.fixture(scope="module")
def arq_web(arq_env: dict[str, Any]) -> Iterator[RunningServer]:
    from arq import create_pool
    from arq_app import REDIS

    import ctxmiddleware

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        name = scope["path"].strip("/")
        redis = await create_pool(REDIS, default_queue_name=arq_env["queue"])
        try:
            args: list[Any] = [query["path"]] if "path" in query else []
            options: dict[str, Any] = {}
            if "defer" in query:
                options["_defer_by"] = float(query["defer"])
            job = await ctxmiddleware.arq_enqueue(redis, name, *args, **options)
            assert job is not None
            await _json(send, {"id": job.job_id})
        finally:
            await redis.aclose()

    with serve(ContextMiddleware(app, timeout=30)) as running:
        yield running


def _arq_result(arq_env: dict[str, Any], job_id: str) -> Any:
    from arq import create_pool
    from arq.jobs import Job
    from arq_app import REDIS

    async def main() -> Any:
        redis = await create_pool(REDIS, default_queue_name=arq_env["queue"])
        try:
            job = Job(job_id, redis, _queue_name=arq_env["queue"])
            try:
                return await job.result(timeout=30), await job.result_info()
            except (Exception, asyncio.CancelledError) as exc:  # (an aborted job)
                return exc, await job.result_info()
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_arq_job_gets_the_request_id_and_deadline(
    arq_env: dict[str, Any], arq_web: RunningServer
) -> None:
    rid = f"arq-{uuid.uuid4().hex[:8]}"
    sent = _call(arq_web, "/describe", ("x-request-id", rid), ("grpc-timeout", "8S"))
    t_sent = time.time()
    result, _ = _arq_result(arq_env, sent["id"])
    assert result["request_id"] == rid
    assert 0 < result["remaining"] <= 8.0 - (result["at"] - t_sent) + 0.05
    assert f"{rid} inside the arq job" in arq_env["log"].read_text()


def test_arq_job_context_expires_at_the_request_deadline(
    arq_env: dict[str, Any], arq_web: RunningServer
) -> None:
    from ctxmiddleware import DeadlineExceeded

    t0 = time.time()
    sent = _call(arq_web, "/wait_deadline", ("x-request-timeout-ms", "1500"))
    result, info = _arq_result(arq_env, sent["id"])
    assert isinstance(result, DeadlineExceeded), repr(result)
    assert info.finish_time.timestamp() - t0 <= 1.5 + 0.3


def test_arq_expired_job_is_not_run(
    arq_env: dict[str, Any], arq_web: RunningServer, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "ran"
    sent = _call(arq_web, f"/mark?path={marker}&defer=1.5", ("x-request-timeout-ms", "300"))
    time.sleep(3)
    assert not marker.exists()
    # The control: deferred but within the budget, it runs.
    sent = _call(arq_web, f"/mark?path={marker}&defer=0.2")
    result, _ = _arq_result(arq_env, sent["id"])
    assert result is True and marker.exists()
    assert sent["id"]


def test_arq_plain_enqueue_runs_the_function_as_is(arq_env: dict[str, Any]) -> None:
    from arq import create_pool
    from arq.jobs import Job
    from arq_app import REDIS

    async def main() -> Any:
        redis = await create_pool(REDIS, default_queue_name=arq_env["queue"])
        try:
            job = await redis.enqueue_job("plain", 21)
            assert job is not None
            return await Job(job.job_id, redis, _queue_name=arq_env["queue"]).result(timeout=30)
        finally:
            await redis.aclose()

    assert asyncio.run(main()) == 42


# -- the stamp itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "stamp",
    [None, "x", {}, {"request_id": 7}, {"request_id": "a" * 200}, {"deadline": "soon"},
     {"deadline": float("nan")}, {"deadline": True}, {"deadline": float("inf")}],
)
def test_a_malformed_stamp_is_ignored(stamp: Any) -> None:
    from ctxmiddleware import REQUEST_ID
    from ctxmiddleware._integrations._jobs import job_context

    ctx, cancel = job_context(stamp)
    assert ctx.err() is None and ctx.deadline() is None and ctx.value(REQUEST_ID) is None
    cancel()


def test_stamp_round_trip() -> None:
    from ctxmiddleware import REQUEST_ID, background, with_timeout, with_value
    from ctxmiddleware._integrations._jobs import job_context, stamp_of

    assert stamp_of(background()) is None
    ctx, cancel = with_timeout(with_value(background(), REQUEST_ID, "rid-1"), 2.0)
    stamp = stamp_of(ctx)
    assert stamp is not None and stamp["request_id"] == "rid-1"
    job, job_cancel = job_context(json.loads(json.dumps(stamp)))  # (it travels as JSON)
    assert job.value(REQUEST_ID) == "rid-1"
    left = job.remaining()
    assert left is not None and 1.9 < left <= 2.0
    past, past_cancel = job_context({"deadline": time.time() - 1})
    assert past.err() is not None
    for fn in (cancel, job_cancel, past_cancel):
        fn()


def test_the_cause_chain_grows_from_request_to_job_to_job() -> None:
    from ctxmiddleware import CAUSE_CHAIN, REQUEST_ID, background, with_value
    from ctxmiddleware._integrations._jobs import MAX_CHAIN, job_context, stamp_of

    request = with_value(background(), REQUEST_ID, "req-1")
    assert request.value(CAUSE_CHAIN) is None  # a request served directly has none
    stamp = stamp_of(request)
    assert stamp is not None and stamp["chain"] == ["req-1"]
    job, job_cancel = job_context(json.loads(json.dumps(stamp)))
    assert job.value(CAUSE_CHAIN) == ("req-1",) and job.value(REQUEST_ID) == "req-1"
    # The job works for the same request id: its own sub-job's chain does not repeat it.
    sub_stamp = stamp_of(job)
    assert sub_stamp is not None and sub_stamp["chain"] == ["req-1"]
    # A job that took a new id (another request) extends the chain.
    other = with_value(job, REQUEST_ID, "req-2")
    other_stamp = stamp_of(other)
    assert other_stamp is not None and other_stamp["chain"] == ["req-1", "req-2"]
    # Bounded: a loop of jobs enqueueing jobs keeps the newest ids only.
    deep = with_value(background(), CAUSE_CHAIN, tuple(f"r{i}" for i in range(100)))
    deep_stamp = stamp_of(with_value(deep, REQUEST_ID, "last"))
    assert deep_stamp is not None and len(deep_stamp["chain"]) == MAX_CHAIN
    assert deep_stamp["chain"][-1] == "last"
    job_cancel()


@pytest.mark.parametrize(
    "chain", [[], ["x"] * 33, ["a", 1], ["\nforged"], "req-1", [""], ["x" * 129]]
)
def test_a_malformed_cause_chain_is_ignored(chain: Any) -> None:
    from ctxmiddleware import CAUSE_CHAIN
    from ctxmiddleware._integrations._jobs import job_context

    ctx, cancel = job_context({"request_id": "r", "chain": chain})
    assert ctx.value(CAUSE_CHAIN) is None
    cancel()


# -- request-bound jobs: revoked / aborted when the request is cut short ------------------


def _bound_web(enqueue: Any) -> Any:
    """``/bound?path=P&hold=1``: enqueue a job (deferred 1.5 s) bound to the
    request, then hold the request open until the client leaves; without
    ``hold`` the request ends normally right away (the job must still run)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        await enqueue(query["path"])
        if "hold" in query:
            await asyncio.sleep(30)  # cancelled when the client leaves
        await _json(send, {})

    return ContextMiddleware(app, timeout=30)


def _leave_early(server: RunningServer, path: str) -> None:
    with server.connect() as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        time.sleep(0.3)  # the job is enqueued; the client goes away


def test_celery_request_bound_job_is_revoked_when_the_client_leaves(
    celery_env: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    import ctxmiddleware

    tasks = celery_env["app"]
    sent: list[Any] = []

    async def enqueue(path: str) -> None:
        result = tasks.mark.apply_async(args=[path], countdown=1.5)
        ctxmiddleware.celery_revoke_on_cancel(result)
        sent.append(result)

    left, stayed = tmp_path / "left", tmp_path / "stayed"
    with serve(_bound_web(enqueue)) as web:
        _leave_early(web, f"/bound?path={left}&hold=1")
        _call(web, f"/bound?path={stayed}")  # ends normally: the job runs
        assert sent[1].get(timeout=30) is True
        deadline = time.monotonic() + 10
        while sent[0].state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert sent[0].state == "REVOKED"
    time.sleep(0.5)
    assert stayed.exists() and not left.exists()


def test_arq_request_bound_job_is_aborted_when_the_client_leaves(
    arq_env: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    from arq import create_pool
    from arq_app import REDIS

    import ctxmiddleware

    ids: list[str] = []

    async def enqueue(path: str) -> None:
        redis = await create_pool(REDIS, default_queue_name=arq_env["queue"])
        job = await ctxmiddleware.arq_enqueue(redis, "mark", path, _defer_by=1.5)
        assert job is not None
        ctxmiddleware.arq_abort_on_cancel(job)
        ids.append(job.job_id)

    left, stayed = tmp_path / "left", tmp_path / "stayed"
    with serve(_bound_web(enqueue)) as web:
        _leave_early(web, f"/bound?path={left}&hold=1")
        _call(web, f"/bound?path={stayed}")
        result, _ = _arq_result(arq_env, ids[1])
        assert result is True
        result, _ = _arq_result(arq_env, ids[0])
    assert isinstance(result, asyncio.CancelledError), repr(result)  # arq's abort
    assert stayed.exists() and not left.exists()
