"""Run a WSGI app under a real server on 127.0.0.1: gunicorn (sync, gthread)
and uWSGI in subprocesses, waitress and werkzeug's dev server in threads."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servers import RunningServer, free_port

TESTS = Path(__file__).parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent

WSGI_SERVERS = ["gunicorn-sync", "gunicorn-gthread", "waitress", "werkzeug"]


def uwsgi_available() -> bool:
    return (BIN / "uwsgi").exists() or shutil.which("uwsgi") is not None


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)
    raise RuntimeError("server did not start")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def serve_wsgi(
    kind: str, app_ref: str = "wsgi_apps:app", threads: int = 8, extra: list[str] | None = None
) -> Iterator[RunningServer]:
    """Serve ``app_ref`` ("module:attr") with ``kind`` until the block exits."""
    port = free_port()
    if kind.startswith("gunicorn") or kind in ("uwsgi", "uvicorn"):
        if kind == "uvicorn":  # an ASGI app (Django's ASGI handler)
            cmd = [
                sys.executable, "-m", "uvicorn", app_ref, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", "--no-proxy-headers",
                "--no-access-log", "--lifespan", "off",
            ]
        elif kind == "uwsgi":
            module, attr = app_ref.split(":")
            cmd = [
                str(BIN / "uwsgi") if (BIN / "uwsgi").exists() else "uwsgi",
                "--http-socket", f"127.0.0.1:{port}", "--module", f"{module}:{attr}",
                "--master", "--processes", "1", "--threads", str(threads),
                "--enable-threads", "--die-on-term", "--disable-logging",
                "--need-app", "--lazy-apps",
                "--pythonpath", str(TESTS), "--pythonpath", str(ROOT),
                "--home", str(BIN.parent),
            ]
        else:
            worker = "sync" if kind == "gunicorn-sync" else "gthread"
            cmd = [
                str(BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "1", "-k", worker,
                "--threads", str(threads if worker == "gthread" else 1),
                "--log-level", "warning", "--graceful-timeout", "1", "--timeout", "60",
                "--keep-alive", "5", app_ref,
            ]
        cmd += extra or []
        proc = subprocess.Popen(
            cmd, env=_env(), cwd=str(TESTS), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=None,
        )
        try:
            _wait_port(port, proc)
            yield RunningServer(kind, "127.0.0.1", port)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return
    module, attr = app_ref.split(":")
    import importlib

    app: Any = getattr(importlib.import_module(module), attr)
    if kind == "waitress":
        from waitress.server import create_server

        server: Any = create_server(
            app, host="127.0.0.1", port=port, threads=threads,
            channel_request_lookahead=1,
            # The middleware, not the server, decides whom to trust.
            clear_untrusted_proxy_headers=False,
        )
        thread = threading.Thread(target=server.run, daemon=True, name="waitress")
        thread.start()
        try:
            _wait_port(port, None)
            yield RunningServer(kind, "127.0.0.1", port)
        finally:
            server.close()
            with contextlib.suppress(Exception):
                server.task_dispatcher.shutdown()
            thread.join(5)
        return
    if kind == "werkzeug":
        import logging

        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True, name="werkzeug")
        thread.start()
        try:
            _wait_port(port, None)
            yield RunningServer(kind, "127.0.0.1", port)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        return
    raise ValueError(kind)
