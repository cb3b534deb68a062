"""WSGI benchmarks, one command: ``python bench/bench_wsgi.py`` prints one table.

* overhead: a hello-world Flask app under gunicorn (sync worker), bare vs with
  ``ctxmiddleware.flask``, by server instructions per request (valgrind's
  cachegrind, no cache simulation: the worker process's count with N requests
  minus its count with none, over N; a noise-free ratio);
* disconnect -> context cancelled: the client closes while the handler waits
  on ``ctx.done()``; the time from ``close()`` to the handler waking (one
  CLOCK_MONOTONIC for client and server processes);
* disconnect -> PostgreSQL backend idle: the handler runs ``pg_sleep(30)``
  (psycopg_transaction_sync, or the Django ORM); the time from ``close()`` to
  ``pg_stat_activity`` showing the backend no longer active;
* deadline lateness: ``x-request-timeout-ms: 100``; the 504's arrival minus
  (send time + 100 ms).

Options: ``--quick`` (fewer runs), ``--no-valgrind``, ``--markdown``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(TESTS), str(ROOT)]

os.environ.setdefault("CTXTEST_EVENTS", tempfile.mkdtemp(prefix="ctxbench-events-"))

# -- the hello-world apps (served by gunicorn: "bench_wsgi:bare_app") ----------


def _flask_app(with_ctx: bool) -> Any:
    from flask import Flask

    app = Flask("hello")

    @app.get("/")
    def hello() -> str:
        return "ok"

    if with_ctx:
        from ctxmiddleware.flask import ContextExtension

        ContextExtension(app, timeout=30)
    return app


if os.environ.get("BENCH_WSGI_APP") == "bare":
    bare_app = _flask_app(False)
elif os.environ.get("BENCH_WSGI_APP") == "ctx":
    ctx_app = _flask_app(True)

# -- helpers -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def get_once(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: b", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


# -- overhead by instructions --------------------------------------------------


def _gunicorn_instructions(variant: str, requests: int) -> int:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
               PYTHONHASHSEED="0", BENCH_WSGI_APP=variant)
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        "--trace-children=yes",
        sys.executable, str(Path(sys.executable).parent / "gunicorn"),
        "-b", f"127.0.0.1:{port}", "-w", "1", "-k", "sync", "--timeout", "600",
        "--log-level", "warning", f"bench_wsgi:{variant}_app",
    ]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            end = time.monotonic() + 600
            while True:
                try:
                    if b" 200 " in get_once(port, "/"):
                        break
                except OSError:
                    pass
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError("gunicorn under valgrind did not start")
                time.sleep(0.2)
            for _ in range(50):  # warm-up
                get_once(port, "/")
            for _ in range(requests):
                get_once(port, "/")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(300)
        err.seek(0)
        text = err.read().decode(errors="replace")
    counts = [int(m.replace(",", "")) for m in re.findall(r"I\s+refs:\s+([\d,]+)", text)]
    if not counts:
        raise RuntimeError(f"no instruction count: {text[-1000:]}")
    return max(counts)  # the worker's (the arbiter executes far fewer)


def overhead(requests: int) -> dict[str, float]:
    out = {}
    for variant in ("bare", "ctx"):
        base = _gunicorn_instructions(variant, 0)
        total = _gunicorn_instructions(variant, requests)
        out[variant] = (total - base) / requests
        print(f"  {variant}: {out[variant]:,.0f} instructions/request", file=sys.stderr)
    return out


# -- latencies -----------------------------------------------------------------


def disconnect_to_cancel(kind: str, runs: int) -> list[float]:
    from wsgi_apps import wait_event
    from wsgi_servers import serve_wsgi

    out = []
    with serve_wsgi(kind) as srv:
        for _ in range(runs):
            tag = uuid.uuid4().hex
            sock = srv.connect()
            sock.sendall(f"GET /m/slow?tag={tag}&seconds=20 HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            wait_event(tag, "started")
            time.sleep(0.002)  # the handler is waiting on ctx.done()
            closed = time.monotonic()
            sock.close()
            done = wait_event(tag, "done", 10)
            out.append((done["t"] - closed) * 1000)
    return out


def _pg_idle_after_close(port: int, path: str, tag: str) -> float:
    import psycopg
    from wsgi_apps import PG_DSN, wait_event

    with psycopg.connect(PG_DSN, autocommit=True) as watch:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"GET {path}?tag={tag} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
        wait_event(tag, "started")
        q = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
             " AND state = 'active' AND query LIKE %s")
        end = time.monotonic() + 10
        while watch.execute(q, [tag, "%pg_sleep%"]).fetchone()[0] == 0:  # type: ignore[index]
            if time.monotonic() > end:
                raise RuntimeError("the query never started")
        closed = time.monotonic()
        sock.close()
        while watch.execute(q, [tag, "%pg_sleep%"]).fetchone()[0] != 0:  # type: ignore[index]
            if time.monotonic() - closed > 10:
                raise RuntimeError("the query was not cancelled")
        return (time.monotonic() - closed) * 1000


def disconnect_to_pg_idle(kind: str, app: str, path: str, runs: int) -> list[float]:
    from wsgi_servers import serve_wsgi

    with serve_wsgi(kind, app) as srv:
        return [_pg_idle_after_close(srv.port, path, uuid.uuid4().hex) for _ in range(runs)]


def deadline_lateness(kind: str, runs: int, floor: bool = False
                      ) -> tuple[list[float], dict[int, int]]:
    """504 lateness; ``floor``: a plain handler (no middleware) waiting 100 ms."""
    from wsgi_servers import serve_wsgi

    out = []
    statuses: dict[int, int] = {}
    path = "/slow?seconds=0.1" if floor else "/m/slow?seconds=20"
    with serve_wsgi(kind) as srv:
        for _ in range(runs):
            sent = time.monotonic()
            raw = get_once(srv.port, path, {"x-request-timeout-ms": "100"})
            arrived = time.monotonic()
            status = int(raw.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            out.append((arrived - sent - 0.100) * 1000)
    return out, statuses


def row(name: str, n: int, values: list[float], target: float | None, extra: str = "") -> list[str]:
    p99 = pct(values, 99)
    verdict = "-" if target is None else ("met" if p99 <= target else "NOT met")
    return [name, str(n), f"{pct(values, 50):.2f}", f"{pct(values, 90):.2f}", f"**{p99:.2f}**",
            f"{max(values):.2f}", "-" if target is None else f"<= {target:g} ms", verdict, extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-valgrind", action="store_true")
    ap.add_argument("--requests", type=int, default=300, help="requests per valgrind run")
    args = ap.parse_args()
    runs = 40 if args.quick else 200
    pg_runs = 20 if args.quick else 60
    rows: list[list[str]] = []
    if not args.no_valgrind:
        print("overhead (valgrind; minutes)...", file=sys.stderr, flush=True)
        ins = overhead(args.requests)
        ratio = ins["bare"] / ins["ctx"]
        overhead_line = (
            f"Flask hello world, gunicorn sync: bare {ins['bare']:,.0f}, with ctxmiddleware.flask "
            f"{ins['ctx']:,.0f} server instructions/request (+{ins['ctx'] - ins['bare']:,.0f}); "
            f"ratio {ratio:.3f} of bare (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
        )
    else:
        overhead_line = "overhead: skipped (--no-valgrind)"
    for kind in ("gunicorn-sync", "gunicorn-gthread"):
        print(f"disconnect -> cancel, {kind}...", file=sys.stderr, flush=True)
        rows.append(row(f"disconnect -> ctx cancelled, {kind}", runs,
                        disconnect_to_cancel(kind, runs), 5))
    for kind, app, path, label in (
        ("gunicorn-sync", "wsgi_apps:app", "/m/pg", "psycopg_transaction_sync, gunicorn-sync"),
        ("gunicorn-gthread", "wsgi_apps:app", "/m/pg",
         "psycopg_transaction_sync, gunicorn-gthread"),
        ("gunicorn-sync", "django_app:application", "/orm_pg", "Django ORM, gunicorn-sync"),
    ):
        print(f"disconnect -> PG idle, {label}...", file=sys.stderr, flush=True)
        rows.append(row(f"disconnect -> PG backend idle, {label}", pg_runs,
                        disconnect_to_pg_idle(kind, app, path, pg_runs), 20))
    for kind in ("gunicorn-sync", "gunicorn-gthread"):
        print(f"deadline, {kind}...", file=sys.stderr, flush=True)
        values, statuses = deadline_lateness(kind, runs)
        rows.append(row(f"deadline 504 lateness (budget 100 ms), {kind}", runs, values, 10,
                        ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))))
        values, statuses = deadline_lateness(kind, runs, floor=True)
        rows.append(row(f"floor: plain handler waiting 100 ms, no middleware, {kind}", runs,
                        values, None, ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))))
    head = ["measure", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "target", "result", "statuses"]
    print(overhead_line)
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
