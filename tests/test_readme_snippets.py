"""The README's Python snippets cannot rot.

Every ```python block either runs here (in process, or under a real uvicorn
on 127.0.0.1 against the real PostgreSQL where it needs a database) or is
marked in the README, on the line right before it, as a fragment with its
reason: ``<!-- fragment: why it cannot run as it stands -->``. Fragments
still have to compile. A new runnable block without a test fails
:func:`test_every_block_is_run_or_a_fragment`.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import WAIT, PgMonitor

README = Path(__file__).resolve().parent.parent / "README.md"
PG_DSN = os.environ.get("CTXMW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Block:
    line: int  # of the ```python fence, 1-based
    code: str
    fragment: str | None  # the reason, if marked as a fragment


def read_blocks(text: str) -> list[Block]:
    blocks = []
    for m in re.finditer(
        r"^(?:<!-- fragment: (?P<reason>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```",
        text,
        re.S | re.M,
    ):
        line = text.count("\n", 0, m.start("code"))  # the fence's line number
        blocks.append(Block(line, m["code"], m["reason"]))
    return blocks


BLOCKS = read_blocks(README.read_text())

# Each runnable block is identified by a string only it contains, and run by
# the test named here.
RUNNERS = {
    "asyncpg.create_pool(DATABASE_URL)": "test_the_headline_snippet_*",
    "with_request_value(USER": "test_the_request_value_snippet_runs",
}


def runnable(key: str) -> str:
    (block,) = [b for b in BLOCKS if b.fragment is None and key in b.code]
    return block.code


def test_blocks_are_found() -> None:
    assert len(BLOCKS) >= 5
    assert len(BLOCKS) == README.read_text().count("```python")


def test_every_block_is_run_or_a_fragment() -> None:
    for block in BLOCKS:
        where = f"README.md:{block.line}"
        if block.fragment is not None:
            assert len(block.fragment.strip()) >= 10, f"{where}: a fragment needs a reason"
            continue
        keys = [key for key in RUNNERS if key in block.code]
        assert len(keys) == 1, (
            f"{where}: a runnable block must be run by a test here (add it to RUNNERS) "
            f"or be marked '<!-- fragment: reason -->' on the line before it"
        )
    for key in RUNNERS:
        found = [b.line for b in BLOCKS if b.fragment is None and key in b.code]
        assert len(found) == 1, f"RUNNERS[{key!r}] matches the runnable blocks at lines {found}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_compiles(index: int) -> None:
    # (top-level await: the helper fragments show the inside of a handler)
    compile(
        BLOCKS[index].code,
        f"README.md:{BLOCKS[index].line}",
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )


def test_the_request_value_snippet_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(runnable("with_request_value(USER"), "README.md", "exec"), namespace)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/me")

    response = asyncio.run(go())
    assert response.json() == {"user": "ada", "same": "ada"}


# -- the headline snippet: FastAPI, asyncpg, a real server and database -------


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    try:
        import asyncpg  # noqa: F401
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3, autocommit=True):
            pass
    except Exception as exc:
        reason = f"PostgreSQL not reachable at {PG_DSN}: {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the database tests must run)")
        pytest.skip(reason)
    return PG_DSN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def headline_server(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The snippet, saved as ``app.py`` and served by ``uvicorn app:app``."""
    directory = tmp_path_factory.mktemp("readme")
    (directory / "app.py").write_text(runnable("asyncpg.create_pool(DATABASE_URL)"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=directory,
        env={**os.environ, "DATABASE_URL": pg_dsn},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"uvicorn app:app exited:\n{proc.communicate()[0]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < end, "uvicorn app:app never listened"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=WAIT)[0]
        print(output)


def test_the_headline_snippet_answers_504_at_the_budget(headline_server: str) -> None:
    t0 = time.monotonic()
    response = httpx.get(
        f"{headline_server}/report", headers={"x-request-timeout-ms": "300"}, timeout=WAIT
    )
    elapsed = time.monotonic() - t0
    assert response.status_code == 504, response.text  # (a NameError would be a 500)
    assert response.headers.get("x-request-id")
    assert 0.3 <= elapsed < 2.0, elapsed


def sleeping_backends(monitor: PgMonitor) -> set[int]:
    rows = monitor.conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(5)'"
    ).fetchall()
    return {row[0] for row in rows}


def test_the_headline_snippet_stops_the_query_when_the_client_leaves(
    headline_server: str, pg_dsn: str
) -> None:
    monitor = PgMonitor(pg_dsn)
    try:
        before = sleeping_backends(monitor)
        port = int(headline_server.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"GET /report HTTP/1.1\r\nhost: localhost\r\n\r\n")
            end = time.monotonic() + WAIT
            while not (ours := sleeping_backends(monitor) - before):
                assert time.monotonic() < end, "the query never started"
                time.sleep(0.01)
            (pid,) = ours
        t_close = time.perf_counter()  # the client left
        t_idle = monitor.wait_not_active(pid, bound=1.0)
        assert t_idle - t_close < 1.0  # (pg_sleep(5) would run 5 s)
    finally:
        monitor.close()


def test_the_headline_snippet_answers_200(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The success path, in process (with a shorter sleep)."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    code = runnable("asyncpg.create_pool(DATABASE_URL)")
    assert "pg_sleep(5)" in code
    namespace: dict[str, Any] = {"__name__": "readme_headline"}
    exec(compile(code.replace("pg_sleep(5)", "pg_sleep(0.01)"), "README.md", "exec"), namespace)
    with TestClient(namespace["app"]) as client:
        response = client.get("/report", headers={"x-request-id": "readme-1"})
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": "readme-1"}
