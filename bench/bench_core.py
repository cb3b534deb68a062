"""Benchmarks of the context core, with comparators, in one run.

    python bench/bench_core.py              # plain table
    python bench/bench_core.py --markdown   # markdown table for the README

Method (the machine may be shared and noisy):

* Every timed operation is a *variant*. Each variant is calibrated once (which
  also warms it up), then measured in ``--rounds`` rounds; within a round every
  variant runs once, in an order rotated from round to round, so slow phases
  of the machine hit all variants alike. The table reports the median per-op
  time over the rounds, and the min-max range.
* Times are ``time.perf_counter_ns`` around a plain ``for`` loop of n ops; the
  loop overhead (printed below the table) is included, not subtracted.
* Async variants run in one persistent event loop, through
  ``loop.run_until_complete``; between them no loop is running, so the sync
  variants really run outside any event loop.
* gc stays enabled in the per-op loops: the objects they create die by
  reference counting, so the cyclic collector barely runs, as in real code.
  It is disabled only around the single timed ``cancel()`` of the fan-out
  benchmark, after a ``gc.collect()``, so that a collection owed to building
  the 10,000 children is not billed to the cancellation.
* Memory is measured with ``tracemalloc``: the bytes still allocated after
  creating 100,000 ``with_cancel`` contexts kept alive with their cancel
  functions (stored in lists allocated beforehand, so the lists do not count).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Benchmark this checkout, even when the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from ctxmiddleware import (
    Context,
    Key,
    background,
    with_cancel,
    with_timeout,
    with_value,
)

perf_ns = time.perf_counter_ns

FANOUT = 10_000
MEM_N = 100_000
DEPTH = 10


# -- variants: fn(n) does n ops and returns the elapsed nanoseconds ----------


def loop_overhead(n: int) -> int:
    t0 = perf_ns()
    for _ in range(n):
        pass
    return perf_ns() - t0


def cancel_background(n: int) -> int:
    bg = background()
    wc = with_cancel
    t0 = perf_ns()
    for _ in range(n):
        _, cancel = wc(bg)
        cancel()
    return perf_ns() - t0


def make_cancel_cancellable() -> Callable[[int], int]:
    parent, _ = with_cancel(background())  # stays live for the whole run

    def cancel_cancellable(n: int) -> int:
        wc = with_cancel
        t0 = perf_ns()
        for _ in range(n):
            _, cancel = wc(parent)
            cancel()
        return perf_ns() - t0

    return cancel_cancellable


def timeout_thread(n: int) -> int:
    assert asyncio._get_running_loop() is None
    bg = background()
    wt = with_timeout
    t0 = perf_ns()
    for _ in range(n):
        _, cancel = wt(bg, 10)
        cancel()
    return perf_ns() - t0


async def timeout_loop(n: int) -> int:
    bg = background()
    wt = with_timeout
    t0 = perf_ns()
    for _ in range(n):
        _, cancel = wt(bg, 10)
        cancel()
    return perf_ns() - t0


def make_value_chain(parent: Context) -> tuple[Context, Key[int]]:
    """A chain of DEPTH with_value contexts; returns it and the key set first."""
    keys = [Key[int](f"k{i}") for i in range(DEPTH)]
    ctx = parent
    for i, key in enumerate(keys):
        ctx = with_value(ctx, key, i)
    return ctx, keys[0]


def make_value_deepest() -> Callable[[int], int]:
    ctx, deepest = make_value_chain(background())
    assert ctx.value(deepest) == 0

    def value_deepest(n: int) -> int:
        value = ctx.value
        t0 = perf_ns()
        for _ in range(n):
            value(deepest)
        return perf_ns() - t0

    return value_deepest


def make_value_miss() -> Callable[[int], int]:
    ctx, _ = make_value_chain(background())
    missing = Key[int]("missing")
    assert ctx.value(missing) is None

    def value_miss(n: int) -> int:
        value = ctx.value
        t0 = perf_ns()
        for _ in range(n):
            value(missing)
        return perf_ns() - t0

    return value_miss


def fanout_cancel(n: int) -> int:
    """Cancel one parent with FANOUT live children, n times; each with a fresh tree."""
    total = 0
    for _ in range(n):
        parent, cancel_parent = with_cancel(background())
        children = [with_cancel(parent) for _ in range(FANOUT)]
        gc.collect()
        gc.disable()
        try:
            t0 = perf_ns()
            cancel_parent()
            total += perf_ns() - t0
        finally:
            gc.enable()
        assert children[0][0].err() is not None and children[-1][0].err() is not None
    return total


async def cmp_asyncio_timeout(n: int) -> int:
    timeout = asyncio.timeout
    t0 = perf_ns()
    for _ in range(n):
        async with timeout(10):
            pass
    return perf_ns() - t0


async def cmp_anyio_scope(n: int) -> int:
    scope = anyio.CancelScope
    t0 = perf_ns()
    for _ in range(n):
        with scope():
            pass
    return perf_ns() - t0


_live_ctx, _ = with_cancel(background())  # never cancelled


async def our_scope(n: int) -> int:
    ctx = _live_ctx
    t0 = perf_ns()
    for _ in range(n):
        async with ctx.scope():
            pass
    return perf_ns() - t0


async def our_timeout_scope(n: int) -> int:
    """What asyncio.timeout(10) does, done with a context: create, scope, cancel."""
    bg = background()
    wt = with_timeout
    t0 = perf_ns()
    for _ in range(n):
        ctx, cancel = wt(bg, 10)
        async with ctx.scope():
            pass
        cancel()
    return perf_ns() - t0


# -- running -----------------------------------------------------------------


@dataclass
class Variant:
    name: str
    fn: Callable[[int], int]
    target_ns: float | None = None
    fixed_n: int | None = None  # None: calibrate
    ours: bool = True
    n: int = 0
    samples: list[float] = field(default_factory=list)  # ns per op


def run_async(
    loop: asyncio.AbstractEventLoop, coro_fn: Callable[[int], Coroutine[Any, Any, int]]
) -> Callable[[int], int]:
    def run(n: int) -> int:
        return loop.run_until_complete(coro_fn(n))

    return run


def calibrate(v: Variant, sample_ns: int) -> None:
    if v.fixed_n is not None:
        v.n = v.fixed_n
        v.fn(v.n)  # warm-up
        return
    n = 16
    while True:
        elapsed = v.fn(n)
        if elapsed >= sample_ns // 4:
            break
        n *= 4
    v.n = max(1, int(n * sample_ns / max(elapsed, 1)))


def measure(variants: list[Variant], rounds: int) -> None:
    k = len(variants)
    for r in range(rounds):
        shift = r % k
        order = variants[shift:] + variants[:shift]
        if r % 2:
            order.reverse()
        for v in order:
            v.samples.append(v.fn(v.n) / v.n)


def bytes_per_context(cancellable_parent: bool) -> float:
    if cancellable_parent:
        parent, cancel_parent = with_cancel(background())
    else:
        parent, cancel_parent = background(), None
    ctxs: list[object] = [None] * MEM_N
    cancels: list[object] = [None] * MEM_N
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(MEM_N):
            ctxs[i], cancels[i] = with_cancel(parent)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert ctxs[-1] is not None
    if cancel_parent is not None:
        cancel_parent()
    return (after - before) / MEM_N


# -- output ------------------------------------------------------------------


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def print_table(headers: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per variant (default 15)")
    ap.add_argument(
        "--sample-ms", type=float, default=20.0, help="target time per sample (default 20)"
    )
    args = ap.parse_args()
    started = time.monotonic()

    loop = asyncio.new_event_loop()
    try:
        asyncio_timeout = Variant(
            "asyncio.timeout(10) enter/exit [comparator]",
            run_async(loop, cmp_asyncio_timeout),
            ours=False,
        )
        variants = [
            Variant("with_cancel(background()) + cancel", cancel_background, 2_000),
            Variant("with_cancel(cancellable parent) + cancel", make_cancel_cancellable()),
            Variant("with_timeout(background(), 10) + cancel, no loop", timeout_thread),
            Variant(
                "with_timeout(background(), 10) + cancel, in loop",
                run_async(loop, timeout_loop),
            ),
            Variant(f"value(): deepest key, chain of {DEPTH}", make_value_deepest(), 1_000),
            Variant(f"value(): miss, chain of {DEPTH}", make_value_miss()),
            Variant(f"cancel parent of {FANOUT:,} children", fanout_cancel, 20_000_000, fixed_n=1),
            asyncio_timeout,
            Variant(
                "anyio.CancelScope() enter/exit [comparator]",
                run_async(loop, cmp_anyio_scope),
                ours=False,
            ),
            Variant("async with ctx.scope(), live ctx", run_async(loop, our_scope)),
            Variant(
                "with_timeout(bg, 10) + ctx.scope() + cancel",
                run_async(loop, our_timeout_scope),
            ),
        ]
        overhead = Variant("empty for-loop iteration", loop_overhead)
        sample_ns = int(args.sample_ms * 1e6)
        for v in [*variants, overhead]:
            calibrate(v, sample_ns)
        measure([*variants, overhead], args.rounds)
    finally:
        loop.close()

    mem_samples: dict[bool, list[float]] = {False: [], True: []}
    for r in range(3):
        for cancellable in (r % 2 == 0, r % 2 != 0):
            mem_samples[cancellable].append(bytes_per_context(cancellable))

    ref = statistics.median(asyncio_timeout.samples)
    failed = 0
    rows: list[list[str]] = []
    for v in variants:
        med = statistics.median(v.samples)
        spread = f"{fmt_ns(min(v.samples))} - {fmt_ns(max(v.samples))}"
        target = f"<= {fmt_ns(v.target_ns)}" if v.target_ns is not None else "-"
        if v.target_ns is None:
            verdict = "-"
        elif med <= v.target_ns:
            verdict = "pass"
        else:
            verdict = "FAIL"
            failed += 1
        ratio = f"{med / ref:.2f}x" if v.fixed_n is None else "-"
        rows.append([v.name, fmt_ns(med), spread, target, verdict, ratio])
    for cancellable, label in ((False, "background"), (True, "cancellable")):
        samples = mem_samples[cancellable]
        med = statistics.median(samples)
        verdict = "pass" if med <= 300 else "FAIL"
        failed += verdict == "FAIL"
        spread = f"{min(samples):.0f} - {max(samples):.0f} B"
        rows.append(
            [
                f"bytes per with_cancel ctx, {label} parent",
                f"{med:.0f} B",
                spread,
                "<= 300 B",
                verdict,
                "-",
            ]
        )

    headers = ["operation", "median", "min - max", "target", "result", "vs asyncio.timeout"]
    elapsed = time.monotonic() - started
    print(
        f"ctxmiddleware core benchmarks: Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.rounds} rounds, {elapsed:.1f} s"
    )
    print()
    print_table(headers, rows, args.markdown)
    print()
    print(
        f"Per-op times include the for-loop overhead "
        f"({fmt_ns(statistics.median(overhead.samples))} per iteration). "
        f"Memory: tracemalloc over {MEM_N:,} live contexts, median of 3."
    )
    print(f"{failed} target(s) missed." if failed else "All targets met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
