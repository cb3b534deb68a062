"""arq worker functions for tests/test_task_queues.py, run by a real worker
process (``python -m arq arq_app.WorkerSettings``)."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import time
from typing import Any, ClassVar

from arq.connections import RedisSettings

import ctxmiddleware
from ctxmiddleware import REQUEST_ID, RequestContextFilter, current

REDIS = RedisSettings(host="127.0.0.1", port=6379, database=12)
QUEUE = os.environ.get("CTXTEST_ARQ_QUEUE", "ctxtest:arq")

logger = logging.getLogger("ctxtest.jobs")
_log = os.environ.get("CTXTEST_JOB_LOG")
if _log:
    handler = logging.FileHandler(_log)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@ctxmiddleware.arq_job
async def describe(arq_ctx: Any) -> dict[str, Any]:
    ctx = current()
    logger.info("inside the arq job")
    return {"request_id": ctx.value(REQUEST_ID), "remaining": ctx.remaining(), "at": time.time()}


@ctxmiddleware.arq_job
async def wait_deadline(arq_ctx: Any) -> None:
    # Cancelled at the request's deadline: the job fails with DeadlineExceeded.
    await asyncio.sleep(10)


@ctxmiddleware.arq_job
async def mark(arq_ctx: Any, path: str) -> bool:
    pathlib.Path(path).touch()
    return True


@ctxmiddleware.arq_job
async def plain(arq_ctx: Any, x: int) -> int:
    return x * 2


class WorkerSettings:
    functions: ClassVar[list[Any]] = [describe, wait_deadline, mark, plain]
    redis_settings = REDIS
    queue_name = QUEUE
    poll_delay = 0.05
    keep_result = 300
    allow_abort_jobs = True
