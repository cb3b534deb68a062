"""Request statistics: ``ctxmiddleware.stats()``, and what the exporters and the
live requests page read.

Off by default. :func:`enable_stats` installs a :class:`Recorder` as the
request layer's one hook (``_request.recorder``): :meth:`Request.end` calls
it once per request, and ``Request.__init__`` notes the request in flight.
While it is ``None`` a request pays for one global lookup at each end.

Counts are kept per outcome, method and *route template* (Starlette and
FastAPI set ``scope["route"]`` once routed; Flask's ``url_rule``; or
:func:`set_route`), never the raw path: their number is bounded by the app's
routes. Requests no route matched count as ``"unmatched"``; methods other
than the standard ones as ``"OTHER"``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._core import Secret, cancel_counts, cause, current, set_wait_observer
from . import _request as _request_module
from ._outcome import Outcome
from ._request import Request, request_of

__all__ = [
    "LATENCY_BUCKETS",
    "REMAINING_BUCKETS",
    "BudgetHistogram",
    "Finished",
    "InFlight",
    "Recorder",
    "Sink",
    "Stats",
    "active_recorder",
    "disable_stats",
    "enable_stats",
    "set_route",
    "stats",
]

LATENCY_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 10.0, 100.0)
"""Lower bounds of the latency buckets (seconds), as Go's x/net/trace: >= 0 s ... >= 100 s."""

REMAINING_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
"""Upper bounds of the "work stopped" histogram (seconds of budget left at cancellation)."""

UNMATCHED = "unmatched"
"""The route of a request no route matched (or an app without routing)."""

_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
_OUTCOMES = tuple(Outcome)
_COMPLETED = Outcome.COMPLETED
_ERROR = Outcome.ERROR
_DEADLINE = Outcome.DEADLINE
_log = logging.getLogger("ctxmiddleware")
_monotonic = time.monotonic
_time = time.time
_bisect = bisect.bisect_right


@dataclass(frozen=True)
class BudgetHistogram:
    """For each cancelled request (client disconnected, deadline, server
    shutdown), the budget it still had when it ended: the work cancellation
    spared. (Measured when the request ended, just after the cancellation
    landed: a lower bound.) Requests without a deadline are only counted."""

    bounds: tuple[float, ...]
    """Upper bounds (seconds); the last is ``math.inf``."""
    counts: tuple[int, ...]
    """Requests per bucket (not cumulative): ``bounds[i-1] < remaining <= bounds[i]``."""
    sum: float
    """Seconds of budget left, summed over the requests with a deadline."""
    no_deadline: int
    """Cancelled requests that had no deadline (what they would have spent is unknown)."""

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class Stats:
    """A snapshot of the request statistics (``ctxmiddleware.stats()``)."""

    enabled: bool
    """Whether statistics are being recorded (:func:`enable_stats`)."""
    outcomes: dict[str, int]
    """Finished requests per outcome (every outcome present)."""
    routes: dict[tuple[str, str, str], int]
    """Finished requests per (outcome, method, route template)."""
    in_flight: int
    """Requests being served now."""
    downstream_cancels: dict[str, int]
    """Cancels sent downstream per driver (``asyncpg``, ``psycopg``, ``sqlite``,
    ``aiosqlite``, ``httpx``); counted even while statistics are off."""
    work_stopped: BudgetHistogram
    """The budget left when cancelled requests ended."""
    latency: dict[str, tuple[int, ...]]
    """Per outcome, requests per latency bucket (:data:`LATENCY_BUCKETS`);
    recorded while the live requests page is mounted (``Recorder.set_detail``)."""
    since: float | None = None
    """When recording started (``time.time()``), None if off."""

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data."""
        return {
            "enabled": self.enabled,
            "since": self.since,
            "outcomes": dict(self.outcomes),
            "routes": [
                {"outcome": o, "method": m, "route": r, "count": n}
                for (o, m, r), n in sorted(self.routes.items())
            ],
            "in_flight": self.in_flight,
            "downstream_cancels": dict(self.downstream_cancels),
            "work_stopped": {
                "buckets": [
                    {"le": "+Inf" if math.isinf(b) else b, "count": n}
                    for b, n in zip(self.work_stopped.bounds, self.work_stopped.counts, strict=True)
                ],
                "count": self.work_stopped.count,
                "sum_seconds": self.work_stopped.sum,
                "no_deadline": self.work_stopped.no_deadline,
            },
            "latency_buckets": list(LATENCY_BUCKETS),
            "latency": {o: list(c) for o, c in self.latency.items()},
        }


@dataclass(frozen=True)
class Finished:
    """One finished request, as the live page lists it."""

    request_id: str
    method: str
    route: str
    path: str
    client_ip: str | None
    outcome: Outcome
    latency: float
    ended_at: float
    """``time.time()`` at the end."""
    status: int
    remaining: float | None
    """Budget left at the end for a cancelled request (None: no deadline, or not cancelled)."""


@dataclass
class InFlight:
    """One request being served, as the live page shows it."""

    request_id: str
    method: str
    route: str
    path: str
    query: str
    client_ip: str | None
    age: float
    remaining: float | None
    """Seconds left before the deadline (None: no deadline)."""
    budget: float | None
    """The whole budget (deadline - arrival), for the bar."""
    waiting: list[tuple[str, float]] = field(default_factory=list)
    """What it waits on now: (what, seconds so far)."""


Sink = Callable[[Request, Outcome, str, str, "float | None"], None]
"""``sink(request, outcome, method, route, remaining)``: an exporter's view
of a request's end (called inside the request's context, root still bound)."""


_ROUTE_KEY = "ctxmiddleware.route"


def _route_of(hook_arg: Mapping[str, Any] | None) -> str:
    if hook_arg is not None:
        found = hook_arg.get("route")  # Starlette, FastAPI (ASGI scope)
        if found is not None:
            path = getattr(found, "path", None)
            if isinstance(path, str):
                return path
        route = hook_arg.get(_ROUTE_KEY)  # set_route()
        if route is not None:
            return str(route)
        if found is None:
            wz = hook_arg.get("werkzeug.request")  # Flask (WSGI environ)
            rule = getattr(getattr(wz, "url_rule", None), "rule", None)
            if isinstance(rule, str):
                return rule
    return UNMATCHED


def _path_and_query(hook_arg: Mapping[str, Any] | None) -> tuple[str, str]:
    if hook_arg is None:
        return "", ""
    if "REQUEST_METHOD" in hook_arg:  # a WSGI environ
        path = hook_arg.get("PATH_INFO", "")
        query = hook_arg.get("QUERY_STRING", "")
    else:
        path = hook_arg.get("path", "")
        raw = hook_arg.get("query_string", b"")
        query = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    return str(path), str(query)


class Recorder:
    """Counts requests as they end (the request layer's hook), keeps the
    requests in flight and the last ``history`` finished ones per outcome."""

    def __init__(self, history: int = 10) -> None:
        self.history = history
        self.since = _time()
        self._lock = threading.Lock()
        # request -> what the adapter passed (ASGI scope, WSGI environ).
        # (Not an attribute of the request: a new attribute unshares the
        # instance dict's keys, which costs a request 3x more.)
        self._live: dict[Request, Any] = {}
        # request -> what it waits on now: [(what, since)] (note_wait)
        self._waits: dict[Request, list[tuple[str, float]]] = {}
        # (Keyed by the outcome's value: an Enum member's hash is Python code.)
        # (outcome, method, route) -> itertools.count()
        self._counts: dict[tuple[str, str, str], Iterator[int]] = {}
        # (outcome, latency bucket) -> itertools.count() (detail only)
        self._latency: dict[tuple[str, int], Iterator[int]] = {}
        self.detail = False
        self._more = False
        self._first_seen = False
        # outcome -> (request, hook_arg, method, route, latency, monotonic end)
        self._recent: dict[str, collections.deque[tuple[Any, ...]]] = {
            o.value: collections.deque(maxlen=history) for o in Outcome
        }
        self._remaining = [0] * len(REMAINING_BUCKETS)
        self._remaining_sum = 0.0
        self._no_deadline = 0
        self._flask_hook: Any = None
        self.sinks: tuple[Sink, ...] = ()
        self.start_sinks: tuple[Callable[[Request], None], ...] = ()
        self._sink_names: dict[str, tuple[Sink | None, Callable[[Request], None] | None]] = {}
        # ended(), the hook every request calls, as a closure (see _make_ended).
        self.__dict__["ended"] = self._make_ended()

    # -- the hook (Request.__init__ and Request.end) ---------------------------

    # (Every request with statistics on runs started() and ended(): they do
    # only what must be done now, names, ids and times are worked out when
    # read; what only the live page or an exporter needs runs only for them.
    # bench/bench_overhead.py --instructions, variant (m).)

    def started(self, request: Request, hook_arg: Any) -> None:
        # The first request: see whether Flask is there, then pick the
        # started() that every later request calls (an instance attribute).
        self._watch_flask()
        self._first_seen = True
        self._pick()
        self.started(request, hook_arg)

    def _started_more(self, request: Request, hook_arg: Any) -> None:
        """started() with an exporter on."""
        self._live[request] = hook_arg
        for sink in self.start_sinks:
            sink(request)

    def ended(self, request: Request, outcome: Outcome, method: object, path: object) -> None:
        """The request's end (the instance's closure from _make_ended() runs
        in its place: this is the same code, as a method)."""
        hook_arg = self._live.pop(request, None)
        if hook_arg is None:
            return  # started before recording began
        found = hook_arg.get("route")
        try:
            # Starlette, FastAPI: the route matched; else the others' ways.
            route = found.path if found is not None else _route_of(hook_arg)
        except AttributeError:
            route = _route_of(hook_arg)
        # No lock: a counter per (outcome, method, route), each an
        # itertools.count, whose next() is atomic (threads of a WSGI server).
        # (A method outside the standard ones finds no counter of its own.)
        key: Any = (outcome._value_, method, route)
        counter = self._counts.get(key)
        if counter is None:
            counter = self._new_counter(key)
        next(counter)
        if outcome is not _COMPLETED or self._more:
            if method not in _METHODS:
                method = "OTHER"
            self._ended_more(request, outcome, hook_arg, method, route)

    def _make_ended(self) -> Callable[[Request, Outcome, object, object], None]:
        """ended() as a closure over what it reads (no attribute or global
        lookups: a few hundred instructions per request)."""
        pop = self._live.pop
        get_counter = self._counts.get
        new_counter = self._new_counter
        ended_more = self._ended_more
        route_of = _route_of
        methods = _METHODS
        completed = _COMPLETED
        next_ = next
        rec = self

        def ended(request: Request, outcome: Outcome, method: object, path: object) -> None:
            hook_arg = pop(request, None)
            if hook_arg is None:
                return  # started before recording began
            found = hook_arg.get("route")
            try:
                route = found.path if found is not None else route_of(hook_arg)
            except AttributeError:
                route = route_of(hook_arg)
            key: Any = (outcome._value_, method, route)
            counter = get_counter(key)
            if counter is None:
                counter = new_counter(key)
            next_(counter)
            if outcome is not completed or rec._more:
                if method not in methods:
                    method = "OTHER"
                ended_more(request, outcome, hook_arg, method, route)

        return ended

    def _ended_more(
        self, request: Request, outcome: Outcome, hook_arg: Any, method: Any, route: str
    ) -> None:
        """The rest of ended(): a cancelled request's budget, the live page's
        latencies and history, the exporters."""
        now = _monotonic()
        remaining = None
        if outcome is not _COMPLETED and outcome is not _ERROR:
            if outcome is _DEADLINE:
                remaining = 0.0
            elif request.deadline_at != math.inf:
                remaining = max(0.0, request.deadline_at - now)
            with self._lock:
                if remaining is None:
                    self._no_deadline += 1
                else:
                    self._remaining[bisect.bisect_left(REMAINING_BUCKETS, remaining)] += 1
                    self._remaining_sum += remaining
        if self.detail:
            if self._waits:
                self._waits.pop(request, None)
            name = outcome._value_
            latency = now - request.arrival
            key = (name, _bisect(LATENCY_BUCKETS, latency) - 1)
            counter = self._latency.get(key)
            if counter is None:
                with self._lock:
                    counter = self._latency.setdefault(key, itertools.count())
            next(counter)
            self._recent[name].append((request, hook_arg, method, route, latency, now))
        for sink in self.sinks:
            try:
                sink(request, outcome, method, route, remaining)
            except Exception:  # an exporter's failure must not fail the request
                _log.exception("ctxmiddleware: a statistics sink failed")

    def _pick(self) -> None:
        """Choose the started() and the work of ended() for the options in force."""
        self._more = bool(self.sinks) or self.detail
        if self._first_seen:
            # Without exporters, a C call: the request's entry in the live dict
            # (setdefault: a fast call, where __setitem__ is a slot wrapper).
            self.__dict__["started"] = (
                self._started_more if self.start_sinks else self._live.setdefault
            )

    def set_detail(self, on: bool = True) -> None:
        """Record latencies and the last finished requests (the live page)."""
        self.detail = on
        self._pick()
        # What a request waits on (the DB helpers, httpx) is noted only for the page.
        set_wait_observer(self.note_wait if on else None)

    def _new_counter(self, key: tuple[str, Any, Any]) -> Iterator[int]:
        outcome, method, route = key
        if method not in _METHODS:  # (never a label of its own: bounded cardinality)
            key = (outcome, "OTHER", route)
            counter = self._counts.get(key)
            if counter is not None:
                return counter
        with self._lock:
            return self._counts.setdefault(key, itertools.count())

    def _watch_flask(self) -> None:
        """Flask forgets its request (``environ["werkzeug.request"] = None``)
        before the WSGI response is closed: note the matched rule in the
        environ when the request starts (Flask's ``request_started`` signal)."""
        flask = sys.modules.get("flask")
        if flask is None:
            return

        def note_rule(sender: object, **extra: object) -> None:
            req = flask.request
            rule = getattr(req.url_rule, "rule", None)
            if isinstance(rule, str):
                req.environ.setdefault(_ROUTE_KEY, rule)

        self._flask_hook = note_rule  # (blinker keeps a weak reference)
        flask.request_started.connect(note_rule)

    # -- exporters -----------------------------------------------------------------

    def add_sink(
        self,
        name: str,
        ended: Sink | None,
        started: Callable[[Request], None] | None = None,
    ) -> None:
        """Call ``ended(...)`` at every request's end (and ``started(request)``
        at its start); replaces the sink registered under ``name``."""
        with self._lock:
            self._sink_names[name] = (ended, started)
            self.sinks = tuple(e for e, _ in self._sink_names.values() if e is not None)
            self.start_sinks = tuple(s for _, s in self._sink_names.values() if s is not None)
        self._pick()

    # -- reading ---------------------------------------------------------------

    def snapshot(self) -> Stats:
        with self._lock:
            counts = list(self._counts.items())
            lat_counts = list(self._latency.items())
            work = BudgetHistogram(
                REMAINING_BUCKETS, tuple(self._remaining), self._remaining_sum, self._no_deadline
            )
        outcomes = {o.value: 0 for o in _OUTCOMES}
        routes: dict[tuple[str, str, str], int] = {}
        buckets = {o.value: [0] * len(LATENCY_BUCKETS) for o in _OUTCOMES}
        for (o, m, r), counter in counts:
            n = _value_of(counter)
            outcomes[o] += n
            routes[(o, m, r)] = n
        for (o, b), counter in lat_counts:
            buckets[o][b] += _value_of(counter)
        latency = {o: tuple(c) for o, c in buckets.items()}
        return Stats(
            enabled=True,
            outcomes=outcomes,
            routes=routes,
            in_flight=len(self._live),
            downstream_cancels=cancel_counts(),
            work_stopped=work,
            latency=latency,
            since=self.since,
        )

    def in_flight(self, with_query: bool = False) -> list[tuple[Request, InFlight]]:
        """The requests being served now, oldest first."""
        now = _monotonic()
        rows = []
        for request, hook_arg in list(self._live.items()):
            path, query = _path_and_query(hook_arg)
            method = hook_arg.get("method") or hook_arg.get("REQUEST_METHOD") or ""
            deadline = request.deadline_at
            waits: list[tuple[str, float]] = [
                (what, now - since) for what, since in list(self._waits.get(request, ()))
            ]
            rows.append((request, InFlight(
                request_id=request.request_id,
                method=str(method) if method in _METHODS else "OTHER",
                route=_route_of(hook_arg),
                path=path,
                query=query if with_query else "",
                client_ip=request.client_ip(),
                age=now - request.arrival,
                remaining=None if deadline == math.inf else deadline - now,
                budget=None if deadline == math.inf else deadline - request.arrival,
                waiting=waits,
            )))
        rows.sort(key=lambda row: -row[1].age)
        return rows

    def note_wait(self, ctx: Any, what: str) -> Callable[[], None] | None:
        """The core's wait observer (``_core.set_wait_observer``): the request
        of ``ctx`` now waits on ``what``; returns what ends the wait."""
        request = request_of(ctx)
        if request is None or request not in self._live:
            return None
        entry = (what, _monotonic())
        waits = self._waits.setdefault(request, [])
        waits.append(entry)

        def done() -> None:
            with contextlib.suppress(ValueError):
                waits.remove(entry)

        return done

    def recent(self) -> dict[Outcome, list[Finished]]:
        """The last ``history`` finished requests per outcome, newest first."""
        with self._lock:
            raw = {o: list(d) for o, d in self._recent.items()}
        wall = _time() - _monotonic()
        out: dict[Outcome, list[Finished]] = {}
        for outcome in _OUTCOMES:
            rows = []
            for request, hook_arg, method, route, latency, end in reversed(raw[outcome.value]):
                remaining = None
                if outcome is _DEADLINE:
                    remaining = 0.0
                elif outcome is not _COMPLETED and outcome is not _ERROR and (
                    request.deadline_at != math.inf
                ):
                    remaining = max(0.0, request.deadline_at - end)
                rows.append(Finished(
                    request.request_id, method, route, _path_and_query(hook_arg)[0],
                    request.client_ip(), outcome, latency, wall + end, request.status, remaining,
                ))
            out[outcome] = rows
        return out


def _value_of(counter: Iterator[int]) -> int:
    """How many times ``next()`` was called on an ``itertools.count()``."""
    text = repr(counter)  # "count(5)"
    return int(text[text.index("(") + 1 : -1])


def active_recorder() -> Recorder | None:
    """The recorder installed by :func:`enable_stats`, None while off."""
    rec = _request_module.recorder
    return rec if isinstance(rec, Recorder) else None


def enable_stats(history: int = 10) -> Recorder:
    """Start recording request statistics (idempotent: the recorder already
    installed is kept). ``history``: finished requests kept per outcome for
    the live page."""
    rec = active_recorder()
    if rec is None:
        rec = Recorder(history)
        _request_module.recorder = rec
    return rec


def disable_stats() -> None:
    """Stop recording: requests cost what they did before (the counts are dropped)."""
    _request_module.recorder = None
    set_wait_observer(None)


def stats() -> Stats:
    """A snapshot of the request statistics: counts per outcome and route
    template, requests in flight, downstream cancels per driver, and the
    budget cancelled requests still had ("work stopped").

    Statistics are off until :func:`enable_stats` (or an exporter, or the live
    page) turns them on; while off, only the downstream cancels are counted.
    """
    rec = active_recorder()
    if rec is not None:
        return rec.snapshot()
    return Stats(
        enabled=False,
        outcomes={o.value: 0 for o in _OUTCOMES},
        routes={},
        in_flight=0,
        downstream_cancels=cancel_counts(),
        work_stopped=BudgetHistogram(
            REMAINING_BUCKETS, (0,) * len(REMAINING_BUCKETS), 0.0, 0
        ),
        latency={o.value: (0,) * len(LATENCY_BUCKETS) for o in _OUTCOMES},
    )


def set_route(template: str) -> None:
    """Name the current request's route template (``"/items/{id}"``) for the
    statistics, where the framework does not say it (Django, plain ASGI or
    WSGI apps). Starlette, FastAPI and Flask routes are found without it.
    Does nothing outside a request served by the middleware, or while
    statistics are off."""
    rec = active_recorder()
    request = request_of(current())
    if rec is not None and request is not None:
        hook_arg = rec._live.get(request)
        if hook_arg is not None:
            hook_arg[_ROUTE_KEY] = str(template)


def cause_name(request: Request) -> str | None:
    """The class name of why the request's root was cancelled (before it ends)."""
    root = getattr(request, "root", None)
    if root is None:
        return None
    why = cause(root)
    if why is None or isinstance(why, Secret):
        return None
    return type(why).__name__
