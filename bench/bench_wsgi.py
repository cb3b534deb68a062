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
import json
import math
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
        "--graceful-timeout", "600", "--log-level", "warning", f"bench_wsgi:{variant}_app",
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
            # Warm-up (50) and the requests, the client keeping 8 connections
            # ahead of the worker (connected, request sent; its response read
            # later): the worker always finds the next client waiting, even
            # if this process lags behind it for a while. (One request at a
            # time, whether the client had connected when the worker came back
            # to accept() depended on timing, the other core's load above all:
            # if not, the worker took its EAGAIN exception and select() path,
            # ~10k instructions more for that request, bare and ctx alike.)
            request = b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
            ahead: list[socket.socket] = []
            for i in range(50 + requests + 8):
                if i < 50 + requests:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                    sock.sendall(request)
                    ahead.append(sock)
                if i >= 8:
                    with ahead.pop(0) as done:
                        while done.recv(65536):
                            pass
        finally:
            # SIGTERM to the arbiter alone: it sends the worker one SIGTERM and
            # waits for it, so the worker always runs its whole exit (the
            # interpreter's finalization, tens of millions of instructions).
            # A SIGTERM to the process group would reach the worker twice: the
            # second one kills it part-way through that exit, at a point that
            # depends on timing, and the count would vary by up to ~200k
            # instructions per request (over 300 requests).
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(600)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
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
    RESULTS.append({"name": name, "n": n, "values": list(values), "target": target,
                    "extra": extra})  # the raw values, for --chart and bench/out/wsgi.json
    p99 = pct(values, 99)
    verdict = "-" if target is None else ("met" if p99 <= target else "NOT met")
    return [name, str(n), f"{pct(values, 50):.2f}", f"{pct(values, 90):.2f}", f"**{p99:.2f}**",
            f"{max(values):.2f}", "-" if target is None else f"<= {target:g} ms", verdict, extra]


# -- results JSON and chart ------------------------------------------------------

OUT = HERE / "out"
RESULTS: list[dict[str, Any]] = []  # one per table row, appended by row()
OVERHEAD_TARGET = 0.90
# table-row name prefix -> (measure key, panel title)
MEASURES = {
    "disconnect -> ctx cancelled, ": ("cancel",
                                      "Client disconnect -> ctx cancelled (handler wakes)"),
    "disconnect -> PG backend idle, ": ("pg_idle",
                                        "Client disconnect -> PostgreSQL backend idle (pg_sleep)"),
    "deadline 504 lateness (budget 100 ms), ": ("deadline",
                                                "Deadline: 504 lateness past the 100 ms budget"),
    "floor: plain handler waiting 100 ms, no middleware, ": ("floor", ""),
}


def save_results(
    path: Path, args: argparse.Namespace, ins: dict[str, float] | None
) -> dict[str, Any]:
    """Write the table's raw values (and the overhead counts) as JSON; return the data."""
    import datetime
    import platform

    rows = []
    for r in RESULTS:
        measure, setup = "other", r["name"]
        for prefix, (key, _) in MEASURES.items():
            if r["name"].startswith(prefix):
                measure, setup = key, r["name"][len(prefix):]
        values = r["values"]
        rows.append({**r, "measure": measure, "setup": setup, "p50": pct(values, 50),
                     "p90": pct(values, 90), "p99": pct(values, 99), "max": max(values)})
    data = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cmd": "python bench/bench_wsgi.py " + " ".join(sys.argv[1:]),
        "quick": bool(args.quick),
        "overhead": None if ins is None else {
            "bare": ins["bare"], "ctx": ins["ctx"], "ratio": ins["bare"] / ins["ctx"],
            "requests": args.requests, "target": OVERHEAD_TARGET,
        },
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return data


def _overhead_panel(ax: Any, ov: dict[str, Any] | None) -> None:
    from matplotlib.ticker import FuncFormatter

    if ov is None:
        ax.text(0.5, 0.5, "overhead not measured\n(run without --no-valgrind)", ha="center",
                va="center", fontsize=11, color="#777777", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("Overhead: server instructions per request (valgrind)", fontsize=10)
        return
    bare, ctx, ratio = ov["bare"], ov["ctx"], ov["ratio"]
    limit = bare / ov["target"]  # the most instructions ctx may take and meet the target
    xs = [0, 1]
    ax.bar(xs, [bare, ctx], color=["#9e9e9e", "#1f77b4"], width=0.55)
    for x, v in zip(xs, (bare, ctx), strict=True):
        ax.text(x, v / 2, f"{v:,.0f}", ha="center", fontsize=10, color="white", fontweight="bold")
    ax.text(1, ctx / 2, f"\n\n({ctx - bare:+,.0f}, {(ctx / bare - 1) * 100:+.1f}%)", ha="center",
            va="center", fontsize=9, color="white")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.axhline(limit, color="green", linestyle="--", linewidth=1,
               label=f"target: ratio >= {ov['target']:.2f} (ctx <= {limit:,.0f})")
    verdict = "met" if ratio >= ov["target"] else "NOT met"
    ax.text(0.5, 0.97, f"ratio bare / ctx = {ratio:.3f}  (target >= {ov['target']:.2f}: {verdict})",
            ha="center", va="top", fontsize=11, fontweight="bold", transform=ax.transAxes,
            color="black" if verdict == "met" else "#d62728")
    ax.set_xticks(xs, ["bare Flask", "Flask + ctxmiddleware.flask"], fontsize=9)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(0, max(ctx, limit) * 1.25)
    ax.set_ylabel("server instructions / request")
    ax.set_title(f"Overhead: Flask hello world, gunicorn sync, valgrind "
                 f"({ov['requests']} requests)", fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.9), fontsize=8)


PCT_COLORS = {"p50": "#aec7e8", "p90": "#6b9bd1", "p99": "#1f4e9c"}
FLOOR_COLORS = {"p50": "#e0e0e0", "p90": "#bdbdbd", "p99": "#8c8c8c"}


def _latency_panel(ax: Any, rows: list[dict[str, Any]], title: str, target: float) -> None:
    from matplotlib.ticker import FuncFormatter

    if not rows:
        ax.axis("off")
        return
    ys = list(range(len(rows)))
    h = 0.26
    labels = []
    for y, r in zip(ys, rows, strict=True):
        floor = r["measure"] == "floor"
        colors = FLOOR_COLORS if floor else PCT_COLORS
        for i, p in enumerate(("p50", "p90", "p99")):
            ax.barh(y + (i - 1) * h, r[p], h, color=colors[p])
        ax.text(r["p99"], y + h, f" p99 {r['p99']:.2f}  (p50 {r['p50']:.2f}, max {r['max']:.2f})",
                va="center", fontsize=7.5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.48, y + 0.48], color="green", linestyle="--",
                    linewidth=1.2)
        setup = r["setup"].replace(", ", "\n")
        if floor:
            head = "floor: no middleware,\nplain 100 ms handler (200)"
            labels.append(f"{head}\n{setup}, n={r['n']}")
        else:
            verdict = "met" if r["p99"] <= r["target"] else "NOT met"
            labels.append(f"{setup}\nn={r['n']}, target {verdict}")
        if r.get("extra") and not floor and r["measure"] == "deadline":
            labels[-1] += f"\n({r['extra']})"
    ax.set_yticks(ys, labels, fontsize=7.5)
    for tick, label in zip(ax.get_yticklabels(), labels, strict=True):
        if "NOT met" in label:
            tick.set_color("#d62728")
    ax.invert_yaxis()
    right = max(max(r["p99"] for r in rows), target)
    low = min(r["p50"] for r in rows)
    if low > 0 and right / low > 8:  # log: a few slow outliers must not flatten p50/p90
        ax.set_xscale("log")
        ax.set_xlim(10 ** math.floor(math.log10(low / 1.5)), right * 12)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        scale = ", log scale"
    else:
        ax.set_xlim(min(0.0, low), right * 1.7)
        scale = ""
    ax.set_xlabel(f"ms{scale} (green dashes: p99 target <= {target:g} ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", color="#eeeeee", zorder=0)
    ax.set_axisbelow(True)


def draw_chart(data: dict[str, Any], path: Path) -> None:
    """One PNG: the overhead panel and, per latency measure, p50/p90/p99 vs target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(2, 2, figsize=(14, 10.5))
    _overhead_panel(axes[0][0], data.get("overhead"))
    rows = data["rows"]
    titles = {key: title for key, title in MEASURES.values()}
    for ax, measures, target in (
        (axes[0][1], ("cancel",), 5.0),
        (axes[1][0], ("pg_idle",), 20.0),
        (axes[1][1], ("deadline", "floor"), 10.0),
    ):
        _latency_panel(ax, [r for r in rows if r["measure"] in measures], titles[measures[0]],
                       target)
    handles: list[Any] = [Patch(color=c, label=p) for p, c in PCT_COLORS.items()]
    handles.append(Patch(color=FLOOR_COLORS["p99"],
                         label="floor (no middleware) p50/p90/p99, light to dark"))
    handles.append(Line2D([], [], color="green", linestyle="--", label="p99 target"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=5,
               fontsize=9, frameon=False)
    fig.suptitle(
        f"ctxmiddleware WSGI benchmarks: {data['date']}, Python {data['python']}, "
        f"{data.get('cpus')} CPUs, gunicorn -w 1 (gthread: 8 threads)"
        + ("  [--quick: few runs]" if data.get("quick") else ""),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.935))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-valgrind", action="store_true")
    ap.add_argument("--requests", type=int, default=300, help="requests per valgrind run")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the valgrind overhead measure (no latency runs)")
    ap.add_argument("--chart", type=Path, metavar="PATH",
                    help="also draw the results as a PNG chart to PATH (e.g. docs/wsgi.png)")
    ap.add_argument("--chart-only", action="store_true",
                    help="measure nothing: redraw --chart PATH from the --json results")
    ap.add_argument("--json", type=Path, default=OUT / "wsgi.json", metavar="PATH",
                    help="where the raw results are saved (default: bench/out/wsgi.json)")
    args = ap.parse_args()
    if args.chart_only:
        if args.chart is None:
            ap.error("--chart-only needs --chart PATH")
        if not args.json.exists():
            ap.error(f"--chart-only: no saved results at {args.json} (run without it first)")
        draw_chart(json.loads(args.json.read_text()), args.chart)
        return
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
    if args.overhead_only:
        print(overhead_line)
        return
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
    data = save_results(args.json, args, None if args.no_valgrind else ins)
    if args.chart is not None:
        draw_chart(data, args.chart)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
