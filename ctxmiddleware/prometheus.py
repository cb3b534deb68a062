"""Prometheus metrics of ctxmiddleware (the ``prometheus`` extra: ``prometheus_client``).

::

    from ctxmiddleware.prometheus import instrument, metrics_app

    instrument()                          # once, at start-up
    app.mount("/metrics", metrics_app())  # or your own exposition

The metrics (route templates, never raw paths: bounded cardinality):

* ``ctxmiddleware_requests_total{outcome,method,route}``: finished requests,
  ``outcome`` one of ``completed``, ``client_disconnected``, ``deadline``,
  ``server_shutdown``, ``error`` (a client disconnect is never a 500);
* ``ctxmiddleware_requests_in_flight``: requests being served;
* ``ctxmiddleware_cancel_remaining_budget_seconds``: a histogram of the budget
  cancelled requests still had: the work cancellation spared;
* ``ctxmiddleware_downstream_cancels_total{kind}``: cancels sent downstream
  (``asyncpg``, ``psycopg``, ``sqlite``, ``aiosqlite``, ``httpx``).

Several worker processes (``uvicorn --workers``, gunicorn): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start,
as prometheus_client's multiprocess mode wants; :func:`metrics_app` then
answers with the sum over every worker.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._core import set_cancel_listener
from ._request import REMAINING_BUCKETS, Outcome, Request, enable_stats

__all__ = ["Metrics", "instrument", "metrics_app", "metrics_wsgi_app", "uninstrument"]

_SINK = "prometheus"
# The "work stopped" buckets of stats() (prometheus_client adds +Inf itself).
_BUCKETS = tuple(bound for bound in REMAINING_BUCKETS if not math.isinf(bound))


@dataclass(frozen=True)
class Metrics:
    """The metric objects :func:`instrument` registered."""

    requests: Counter
    in_flight: Gauge
    remaining_budget: Histogram
    downstream_cancels: Counter
    registry: CollectorRegistry


_installed: Metrics | None = None


def instrument(
    registry: CollectorRegistry | None = None,
    *,
    buckets: tuple[float, ...] = _BUCKETS,
) -> Metrics:
    """Register the metrics in ``registry`` (the default registry if None) and
    feed them from every request's end; turns the statistics on
    (``ctxmiddleware.enable_stats()``). Calling it again returns the metrics
    already installed."""
    global _installed
    if _installed is not None:
        return _installed
    registry = REGISTRY if registry is None else registry
    requests = Counter(
        "ctxmiddleware_requests_total",
        "Finished requests by how they ended (outcome), method and route template.",
        ["outcome", "method", "route"],
        registry=registry,
    )
    in_flight = Gauge(
        "ctxmiddleware_requests_in_flight",
        "Requests being served.",
        registry=registry,
        multiprocess_mode="livesum",
    )
    remaining = Histogram(
        "ctxmiddleware_cancel_remaining_budget_seconds",
        "Budget (seconds to the deadline) cancelled requests still had when they ended.",
        buckets=buckets,
        registry=registry,
    )
    downstream = Counter(
        "ctxmiddleware_downstream_cancels_total",
        "Cancels sent downstream (database cancel requests, interrupts, HTTP calls cut short).",
        ["kind"],
        registry=registry,
    )
    children: dict[tuple[str, str, str], Any] = {}
    gauge_inc, gauge_dec = in_flight.inc, in_flight.dec

    def started(request: Request) -> None:
        gauge_inc()

    def ended(
        request: Request, outcome: Outcome, method: str, route: str, left: float | None
    ) -> None:
        gauge_dec()
        key = (outcome.value, method, route)
        child = children.get(key)
        if child is None:
            child = children[key] = requests.labels(*key)
        child.inc()
        if left is not None:
            remaining.observe(left)

    def cancelled(kind: str) -> None:
        downstream.labels(kind).inc()

    rec = enable_stats()
    rec.add_sink(_SINK, ended, started)
    set_cancel_listener(_SINK, cancelled)
    _installed = Metrics(requests, in_flight, remaining, downstream, registry)
    return _installed


def uninstrument() -> None:
    """Stop feeding the metrics (they stay registered: prometheus_client cannot
    register the same names twice in one registry)."""
    global _installed
    from ._request import active_recorder

    rec = active_recorder()
    if rec is not None:
        rec.add_sink(_SINK, None, None)
    set_cancel_listener(_SINK, None)
    if _installed is not None:
        _installed.in_flight.set(0)
    _installed = None


def _scrape_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    if registry is not None:
        return registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return REGISTRY


def metrics_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app answering the exposition of ``registry`` (the default one;
    in multiprocess mode, every worker's metrics summed)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(_scrape_registry(registry))


def metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """The WSGI counterpart of :func:`metrics_app`."""
    from prometheus_client import make_wsgi_app

    return make_wsgi_app(_scrape_registry(registry))
