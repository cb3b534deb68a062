"""``python -m example_app`` (what ``make run`` starts): it says where it
listens and what to try once it is ready, and Ctrl-C during a running
request stops it promptly (the request is cancelled, not waited for)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAIT = 15.0  # start-up bound (imports); reached only on failure
PROMPT_EXIT = 2.0  # SIGINT to exit, with a /slow request running

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    """The demo in a subprocess; its output (stdout and stderr) line by line."""

    def __init__(self, port: int) -> None:
        env = {
            **os.environ,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("DATABASE_URL", None)  # the embedded SQLite
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "example_app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        end = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            left = end - time.monotonic()
            assert left > 0, f"never printed {text!r}; output:\n{''.join(self.seen)}"
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=left))

    def output(self) -> str:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return "".join(self.seen)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)


def test_banner_and_prompt_ctrl_c_during_a_slow_request() -> None:
    port = free_port()
    demo = Demo(port)
    try:
        url = f"http://localhost:{port}"
        demo.wait_for("Ctrl-C to stop")
        banner = demo.output()
        assert url in banner, banner
        for command in (
            f"curl -i '{url}/slow?seconds=10'",
            f"curl -i -H 'x-request-timeout-ms: 500' '{url}/slow'",
            f"curl -i '{url}/report?seconds=5'",
            f"curl -i '{url}/fanout'",
            f"'{url}/values'",
        ):
            assert command in banner, (command, banner)

        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        try:
            client.sendall(b"GET /slow?seconds=10 HTTP/1.1\r\nhost: localhost\r\n\r\n")
            demo.wait_for("slow: working")  # the handler runs
            t0 = time.monotonic()
            demo.proc.send_signal(signal.SIGINT)  # Ctrl-C
            demo.proc.wait(WAIT)
            elapsed = time.monotonic() - t0
        finally:
            client.close()
        output = demo.output()
        assert elapsed < PROMPT_EXIT, f"exited {elapsed:.2f} s after Ctrl-C:\n{output}"
        assert demo.proc.returncode == 0, output
        assert "shutting down (1 request(s) running" in output, output
        assert "slow: cancelled" in output, output  # the handler was interrupted
        assert "Traceback" not in output, output
    finally:
        demo.stop()
