"""What each hot-path trick of ContextMiddleware saves, in instructions per request.

One command: ``python bench/bench_hotpath.py`` (needs valgrind). Each row runs
hello-world Starlette in process (uvloop, no server: the middleware's own cost),
under valgrind's cachegrind, with the middleware as shipped or with ONE trick
replaced by its plain form; the difference is what the trick saves. Instruction
counts do not move with the machine's load, so the rows compare exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "bare": "bare Starlette (no middleware)",
    "shipped": "ContextMiddleware as shipped",
    "plain-header-scan": "header scan: a Python loop over every header (not one C test)",
    "plain-request-id": "request id: uuid.uuid4().hex per request (not the pooled ids)",
    "coroutine-send": "send: an async def wrapper (not the server's own awaitable)",
    "timer-per-request": "grace: a loop timer per request (not one batched check)",
}


def _apply(variant: str) -> None:
    """Replace one trick by its plain form (monkeypatching the shipped code)."""
    from ctxmiddleware._asgi import _exchange, _response
    from ctxmiddleware._request import _request

    if variant == "plain-header-scan":

        class AlwaysOurs(frozenset[bytes]):
            def isdisjoint(self, other: object) -> bool:
                return False

        orig = _request.Request.__init__

        def init(self, config, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not isinstance(config.header_names, AlwaysOurs):
                object.__setattr__(config, "header_names", AlwaysOurs(config.header_names))
            orig(self, config, *args, **kwargs)

        _request.Request.__init__ = init  # type: ignore[method-assign]
    elif variant == "plain-request-id":
        import uuid

        _request.ID_POOL = []  # type: ignore[attr-defined]
        _request.new_request_id = lambda: uuid.uuid4().hex.encode()  # type: ignore[attr-defined]
    elif variant == "coroutine-send":
        orig_send = _response.ResponseTracker.send

        async def send(self, message):  # type: ignore[no-untyped-def]
            await orig_send(self, message)

        _response.ResponseTracker.send = send  # type: ignore[method-assign,assignment]
    elif variant == "timer-per-request":

        def begin(self, watchdog):  # type: ignore[no-untyped-def]
            loop = self.loop = watchdog.loop
            self.task = asyncio.current_task(loop)
            handle = loop.call_later(watchdog.grace, self.start_watching)
            self.grace_timer = handle

        orig_finish = _exchange.AsgiRequest.finish

        def finish(self, scope):  # type: ignore[no-untyped-def]
            self.grace_timer.cancel()
            orig_finish(self, scope)

        _exchange.AsgiRequest.begin = begin  # type: ignore[method-assign]
        _exchange.AsgiRequest.finish = finish  # type: ignore[method-assign]


def serve_in_process(variant: str, requests: int) -> None:
    """Run ``requests`` hello-world requests through the app (the valgrind child)."""
    import uvloop
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ctxmiddleware import ContextMiddleware

    if variant not in ("bare", "shipped"):
        _apply(variant)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    middleware = [] if variant == "bare" else [Middleware(ContextMiddleware)]
    app = Starlette(routes=[Route("/", hello)], middleware=middleware)
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"wrk/4.2"), (b"accept", b"*/*"),
               (b"accept-encoding", b"gzip, deflate")]

    async def main() -> None:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            pass

        loop = asyncio.get_running_loop()
        for _ in range(requests + 50):  # (+50: warm-up, in both runs)
            scope = {
                "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/",
                "raw_path": b"/", "query_string": b"", "root_path": "", "headers": list(headers),
                "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
            }
            await loop.create_task(app(scope, receive, send))

    uvloop.run(main())


def _instructions(variant: str, requests: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, __file__, "--child", variant, "--requests", str(requests)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0",
                                                 PYTHONPATH=str(ROOT)), check=True,
    )
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if m is None:
        raise RuntimeError(out.stderr[-500:])
    return int(m.group(1).replace(",", ""))


def per_request(variant: str, requests: int) -> float:
    return (_instructions(variant, requests) - _instructions(variant, 0)) / requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.child:
        serve_in_process(args.child, args.requests)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(VARIANTS, pool.map(lambda v: per_request(v, args.requests),
                                              VARIANTS), strict=True))
    bare, shipped = results["bare"], results["shipped"]
    rows = [("variant", "instructions/request", "middleware's share", "trick saves")]
    for v, label in VARIANTS.items():
        n = results[v]
        share = "-" if v == "bare" else f"{n - bare:+,.0f}"
        saves = "" if v in ("bare", "shipped") else f"{n - shipped:+,.0f}"
        rows.append((label, f"{n:,.0f}", share, saves))
    if args.markdown:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
