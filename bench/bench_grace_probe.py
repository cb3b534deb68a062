"""Where ContextMiddleware's extra instructions under valgrind come from.

    .venv/bin/python bench/bench_grace_probe.py                  # variants j,l,b
    .venv/bin/python bench/bench_grace_probe.py --variants j --markdown

Serves the variants of bench_overhead.py (``build_app``) with ContextMiddleware's
disconnect-grace machinery switched off piece by piece, by monkeypatching the
middleware *in the served process* (the package is not edited), and counts
the server instructions per request under valgrind like
``bench_overhead.py --instructions``:

* ``stock``: as shipped (1 ms grace, the shared ``_GraceTicker``);
* ``noticker``: ``_GraceTicker.schedule`` does nothing: no tick ever, so no
  request ever reaches the end of its grace (no CancelScope, no deadline
  timer, no watcher task): the hot path alone;
* ``tickonly``: the ticker ticks as shipped, but a request whose grace is over
  only gets its flag set (``_grace_over`` and ``_start_watcher`` stubbed): the
  cost of the ticks themselves;
* ``nowatcher``: as shipped but ``_start_watcher`` does nothing: ticks plus
  ``_start_watching`` (CancelScope entered in the task + the deadline timer);
  stock - nowatcher = the watcher task that reads the server's receive();
* ``grace0``: ``disconnect_grace=0`` (a valid option): every request starts
  watching at once: what the per-request watching costs when every request
  pays for it.

Then ``count``: the same server with counters on the tick, on ``_grace_over``,
``_start_watching``, the watcher task and the requests, run under valgrind
and natively (same load), to show how often the grace machinery runs per
request in each: under valgrind the server is ~40x slower in wall-clock time
while the grace is still 1 ms of wall-clock time.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_overhead as bo  # noqa: E402

PATCHES = {
    "stock": "as shipped (1 ms grace)",
    "noticker": "grace timer never set: hot path only",
    "tickonly": "grace timer runs, but grace over = nothing (no scope/timer/watcher)",
    "nowatcher": "grace timer + cancel hook/deadline timer, no watcher task",
    "grace0": "disconnect_grace=0: every request watches at once",
}
# What is counted per request: the timer/check callbacks, start_watching, the
# watcher task, the requests.
COUNTED = ["tick", "check", "start_watching", "watcher", "end"]


def apply_patch(patch: str) -> None:
    """Patch the middleware of either layout: before the _request/_asgi split
    (ctxmiddleware._web._asgi, _GraceTicker) or after it (_asgi._watch.Watchdog)."""
    from ctxmiddleware import ContextMiddleware

    def stub(obj: Any, name: str, value: Any) -> None:
        if not hasattr(obj, name):
            raise SystemExit(f"{obj.__name__}.{name} is gone: the probe needs updating")
        setattr(obj, name, value)

    try:
        from ctxmiddleware._web import _asgi as web
    except ImportError:
        web = None
    counted: dict[str, tuple[Any, str]]
    if web is not None:  # old layout: one shared ticker, per-request _grace_over
        ticker, req = web._GraceTicker, web._HttpRequest
        patches = {
            "noticker": [(ticker, "schedule", lambda self: None)],
            "tickonly": [(req, "_grace_over", lambda self: setattr(self, "grace_over", True)),
                         (req, "_start_watcher", lambda self: None)],
            "nowatcher": [(req, "_start_watcher", lambda self: None)],
        }
        counted = {"tick": (ticker, "tick"), "start_watching": (req, "_start_watching"),
                   "watcher": (req, "_watch"), "end": (req, "_end")}
    else:  # new layout: Watchdog (call_soon check, then a timer), AsgiRequest
        from ctxmiddleware._asgi._exchange import AsgiRequest as req
        from ctxmiddleware._asgi._watch import Watchdog as dog

        def check_only(self: Any) -> None:
            self.check_scheduled = False
            self.fresh = []

        patches = {
            "noticker": [(dog, "check", check_only)],
            "tickonly": [(req, "start_watching", lambda self: None)],
            "nowatcher": [(req, "start_watcher", lambda self: None)],
        }
        counted = {"tick": (dog, "grace_over"), "check": (dog, "check"),
                   "start_watching": (req, "start_watching"),
                   "watcher": (req, "watch_receive"), "end": (req, "finish")}
    if patch == "grace0":
        defaults = ContextMiddleware.__init__.__kwdefaults__
        assert defaults is not None and "disconnect_grace" in defaults
        defaults["disconnect_grace"] = 0.0
    elif patch in patches:
        for obj, name, value in patches[patch]:
            stub(obj, name, value)
    elif patch not in ("stock", "count"):
        raise SystemExit(f"unknown patch {patch!r}")
    if patch == "count":
        counts: Counter[str] = Counter({k: 0 for k in COUNTED})
        for key, (cls, name) in counted.items():
            orig = getattr(cls, name)

            def counting(*args: Any, _orig: Any = orig, _key: str = key) -> Any:
                counts[_key] += 1
                return _orig(*args)

            stub(cls, name, counting)
        atexit.register(lambda: print("PROBE-COUNTS " + json.dumps(counts), file=sys.stderr))


def serve_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--serve", required=True, help="VARIANT:PATCH")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    variant, _, patch = a.serve.partition(":")
    sys.path.insert(0, str(bo.SRC))
    apply_patch(patch or "stock")
    bo.run_uvicorn(bo.build_app(variant), a.port)


def counts_per_request(
    variant: str, requests: int, connections: int, valgrind: bool
) -> dict[str, float]:
    script = Path(__file__).resolve()

    def run(n: int) -> Counter[str]:
        _, err = bo.serve_measured(script, f"{variant}:count", n, connections, valgrind)
        m = re.search(r"PROBE-COUNTS (\{.*\})", err)
        if m is None:
            raise RuntimeError(f"no counts: {err[-500:]}")
        return Counter(json.loads(m.group(1)))

    base, loaded = run(0), run(requests)
    n = requests // connections * connections
    return {k: (loaded.get(k, 0) - base.get(k, 0)) / n for k in COUNTED}


def main() -> None:
    if "--serve" in sys.argv:
        serve_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="j,l,b", help="bench_overhead variants with "
                   "ContextMiddleware (b, j, l)")
    p.add_argument("--patches", default=",".join(PATCHES))
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--conns", default="1,8")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--src", type=Path,
                   help="import ctxmiddleware from DIR (a snapshot) instead of this checkout")
    args = p.parse_args()
    if args.src is not None:
        bo.SRC = args.src.resolve()
        os.environ["CTXMW_BENCH_SRC"] = str(bo.SRC)
    conns = sorted({int(c) for c in args.conns.split(",")})
    if args.requests < max(800, 100 * conns[-1]):
        raise SystemExit("--requests: at least 800, and 100 per connection")
    variants = [v for v in args.variants.split(",") if v]
    patches = [x for x in args.patches.split(",") if x]
    t0 = time.monotonic()
    script = Path(__file__).resolve()
    rows = []
    for v in variants:
        bare = bo.BASELINE[v]
        res = {"bare": bo.per_request_instructions(bare, args.requests, conns)}
        print(f"  ({bare}) {res['bare']}", file=sys.stderr, flush=True)
        for patch in patches:
            res[patch] = bo.per_request_instructions(
                f"{v}:{patch}", args.requests, conns, script=script)
            print(f"  ({v}) {patch}: {res[patch]}", file=sys.stderr, flush=True)
        cnt = {(mode, c): counts_per_request(v, args.requests, c, mode == "valgrind")
               for mode in ("valgrind", "native") for c in conns}
        rows.append((v, bare, res, cnt))

    for v, bare, res, cnt in rows:
        print(f"\n({v}) {bo.VARIANTS[v]}; bare = ({bare})\n")
        head = ["served as", "what"]
        for c in conns:
            head += [f"instr/req {c} conn", f"- bare, {c} conn"]
        body = []
        for name, what in [("bare", f"({bare}) no middleware")] + [
                (x, PATCHES[x]) for x in patches]:
            line = [name, what]
            for c in conns:
                line += [f"{res[name][c]:,.0f}", f"{res[name][c] - res['bare'][c]:+,.0f}"]
            body.append(line)
        print(bo.render_table(head, body, args.markdown))
        steps = [("ticks (tickonly - noticker)", "tickonly", "noticker"),
                 ("CancelScope + deadline timer (nowatcher - tickonly)", "nowatcher", "tickonly"),
                 ("watcher task (stock - nowatcher)", "stock", "nowatcher"),
                 ("all grace machinery (stock - noticker)", "stock", "noticker"),
                 ("every request watching (grace0 - noticker)", "grace0", "noticker")]
        head = ["component"] + [f"instr/req, {c} conn" for c in conns]
        body = [[name] + [f"{res[a][c] - res[b][c]:+,.0f}" for c in conns]
                for name, a, b in steps if a in res and b in res]
        print()
        print(bo.render_table(head, body, args.markdown))
        head = ["per request", *(f"{mode}, {c} conn" for mode in ("valgrind", "native")
                                 for c in conns)]
        body = [[k] + [f"{cnt[(mode, c)][k]:.3f}" for mode in ("valgrind", "native")
                       for c in conns] for k in COUNTED]
        print()
        print(bo.render_table(head, body, args.markdown))
    print(f"\n{args.requests:,} requests per run, {time.monotonic() - t0:.0f} s.")


if __name__ == "__main__":
    main()
