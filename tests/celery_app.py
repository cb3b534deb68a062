"""A Celery app for tests/test_task_queues.py, imported by the web side (the
test) and by a real worker process (``celery -A celery_app worker``)."""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

from celery import Celery

import ctxmiddleware
from ctxmiddleware import REQUEST_ID, RequestContextFilter, current

BROKER = os.environ.get("CTXTEST_CELERY_BROKER", "redis://127.0.0.1:6379/11")
QUEUE = os.environ.get("CTXTEST_CELERY_QUEUE", "ctxtest")

app = Celery("ctxtest", broker=BROKER, backend=BROKER)
app.conf.task_default_queue = QUEUE
app.conf.result_expires = 300
app.conf.broker_connection_retry_on_startup = True
ctxmiddleware.install_celery(app)

logger = logging.getLogger("ctxtest.jobs")
_log = os.environ.get("CTXTEST_JOB_LOG")
if _log:
    handler = logging.FileHandler(_log)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@app.task
def describe() -> dict[str, Any]:
    ctx = current()
    logger.info("inside the celery job")
    return {"request_id": ctx.value(REQUEST_ID), "remaining": ctx.remaining(), "at": time.time()}


@app.task
def wait_deadline() -> dict[str, Any]:
    ctx = current()
    fired = ctx.done().wait(10)
    return {"fired": fired, "err": type(ctx.err()).__name__, "at": time.time()}


@app.task
def mark(path: str) -> bool:
    pathlib.Path(path).touch()
    return True
