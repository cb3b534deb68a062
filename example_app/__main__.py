"""``python -m example_app``: serve the demo on http://127.0.0.1:8000
(``--wsgi``: the same endpoints through Flask under gunicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys

import uvicorn

import ctxmiddleware


def main() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ctxmiddleware.RequestContextFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s [%(request_id)s %(client_ip)s] %(message)s")
    )
    for name in ("example_app", "ctxmiddleware"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if "--wsgi" in sys.argv[1:]:  # the same demo through Flask under gunicorn
        from .wsgi import serve

        serve(os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000")))
        return
    config = uvicorn.Config(
        "example_app.app:app",
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        # ContextMiddleware decides which proxies to trust (TRUSTED_PROXIES).
        proxy_headers=False,
        log_level="warning",
        # Ctrl-C: requests still running (a /slow one) are cancelled after
        # this, instead of being waited for.
        timeout_graceful_shutdown=SHUTDOWN_GRACE,  # type: ignore[arg-type]  # (a float works)
    )
    logging.getLogger("uvicorn.error").addFilter(_quiet_shutdown_cancel)
    with contextlib.suppress(KeyboardInterrupt):  # (uvicorn re-raises the Ctrl-C)
        _Server(config).run()


SHUTDOWN_GRACE = 0.5  # seconds

BANNER = """\
ctxmiddleware demo: {url} (Ctrl-C to stop). Try, in another terminal:
  curl -i '{url}/slow?seconds=10'                      # Ctrl-C it: logged as cancelled, 499
  curl -i -H 'x-request-timeout-ms: 500' '{url}/slow'  # 504 after 0.5 s
  curl -i '{url}/report?seconds=5'                     # slow SQL query; Ctrl-C stops it in the DB
  curl -i '{url}/fanout'                               # downstream call + query, cancelled together
  curl -i -H 'Authorization: Bearer s3cret' '{url}/values'  # values; the token stays redacted
  curl -i '{url}/background'                           # answers now; a BackgroundTask runs after
Live requests page (in flight, outcomes, latencies): {url}/debug/requests/\
"""


def banner(host: str, port: int) -> str:
    """What to try, once the server listens (uvicorn's own banner is hidden by
    log_level="warning")."""
    shown = "localhost" if host in ("0.0.0.0", "::", "127.0.0.1") else host
    return BANNER.format(url=f"http://{shown}:{port}")


def _quiet_shutdown_cancel(record: logging.LogRecord) -> bool:
    """No traceback for a request cancelled by the shutdown (uvicorn logs one;
    the handler and the middleware log the cancellation themselves)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (_shutting_down and isinstance(exc, asyncio.CancelledError))


_shutting_down = False


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # listening
            print(banner(self.config.host, self.config.port), flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        global _shutting_down
        _shutting_down = True
        running = len(self.server_state.tasks)
        print(
            f"shutting down ({running} request(s) running: cancelled after {SHUTDOWN_GRACE} s)",
            flush=True,
        )
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
