"""One request as every adapter sees it: its values, its deadline, how it ended."""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable
from typing import Any

from .._core import (
    AUTH_TOKEN,
    CLIENT_IP,
    REQUEST_ID,
    TRACEPARENT,
    Context,
    DeadlineExceeded,
    RootContext,
    Secret,
    current,
    parse_budget_ms,
    parse_grpc_timeout,
    parse_request_start,
    parse_traceparent,
    root_of,
    with_value,
)
from ._config import HeaderRole, RequestConfig, positive_seconds
from ._headers import (
    ID_POOL,
    bearer_token,
    forwarded_for_hops,
    new_request_id,
    parse_ip,
    resolve_client_ip,
    sane_request_id,
)
from ._outcome import Outcome, decide_outcome, log_outcome

__all__ = ["EAGER_BODY_LIMIT", "Request", "request_of", "set_request_timeout"]

_name_of = operator.itemgetter(0)

_monotonic = time.monotonic
_INF = math.inf
_UNSET: Any = object()

# The statistics hook (``ctxmiddleware.enable_stats``, _stats.Recorder): None
# while off, when a request pays one global lookup at its start and its end.
recorder: Any = None

EAGER_BODY_LIMIT = 64 * 1024
"""Bodies up to this size may be read ahead (to see a disconnect while the
app does not read); larger or unknown ones never are: they keep the server's
backpressure, so a client cannot make the server buffer what it sends."""

_R_ID = HeaderRole.REQUEST_ID
_R_BUDGET = HeaderRole.BUDGET
_R_AUTH = HeaderRole.AUTHORIZATION
_R_LENGTH = HeaderRole.CONTENT_LENGTH
_R_CHUNKED = HeaderRole.TRANSFER_ENCODING
_R_GRPC = HeaderRole.BUDGET_GRPC
_R_START = HeaderRole.REQUEST_START
_R_TRACE = HeaderRole.TRACEPARENT

_wall = time.time
MAX_QUEUE_SECONDS = 3600.0
"""An ``X-Request-Start`` further back than this is a clock problem, not a queue: ignored."""


class Request:
    """One request, framework-neutral: the adapters (ASGI, WSGI) subclass it.

    It reads the headers once (request id, budget, bearer token, forwarding
    chain, body framing), builds the request's root context
    (:attr:`root`, with the deadline), answers ``REQUEST_ID``, ``CLIENT_IP``
    and ``AUTH_TOKEN`` for it (worked out when first asked for: most requests
    never ask), and decides and logs how the request ended.

    The adapter records what happened in the attributes below; then
    :meth:`end` ends the root context and returns the :class:`Outcome`.
    """

    # Class-level defaults: most requests never change most of these.
    budget_ms: int | None = None
    """The caller's budget, in whole ms (the smallest of its budget headers)."""
    budget: float | None = None
    """The caller's budget, in seconds (the smallest of its budget headers)."""
    queued = 0.0
    """Seconds the request waited behind a trusted proxy (``X-Request-Start``)."""
    traceparent: str | None = None
    """The caller's W3C ``traceparent``, if valid (TRACEPARENT)."""
    start_deadline = _INF
    """The deadline the headers set at arrival: the budget, and the queue time
    counted against the middleware's timeout."""
    deadline_at = _INF
    """The deadline (``time.monotonic()``), math.inf for none."""
    header_deadline = _INF
    """``arrival + budget``: the caller's budget caps every deadline."""
    urgent = False
    """The deadline comes within the disconnect grace period: watch at once."""
    _request_id: str | None = None
    _client_ip: str | None = _UNSET
    _token: Secret | None = _UNSET
    _auth: bytes | None = None
    _fwd: list[bytes] | None = None
    _length: bytes | None = None
    _chunked = False

    # What happened, recorded by the adapter (see decide_outcome).
    complete = False
    client_gone = False
    answered_timeout = False
    cancelled_from_outside = False
    failed = False
    status = 0
    outcome: Outcome | None = None

    def __init__(
        self,
        config: RequestConfig,
        peer: str | None,
        headers: Iterable[tuple[bytes, bytes]],
        body_may_stream: bool,
        hook_arg: Any,
        timed: bool = True,
    ) -> None:
        """``headers``: (lower-case name, value) pairs; ``body_may_stream``: the
        protocol allows a body without Content-Length or Transfer-Encoding
        (HTTP/2 and 3); ``hook_arg``: what the ``values`` hook is given;
        ``timed``: the middleware's timeout and the caller's budget apply (not
        to a websocket, whose lifetime is the connection's)."""
        self.config = config
        arrival = self.arrival = _monotonic()
        self._peer = peer
        self.body_may_stream = body_may_stream
        # Most requests carry none of the headers we read: tell that in C (no
        # Python-level loop over every header), then read ours in order.
        # (bench/RESULTS.md, "header scan".)
        rid = None
        if not config.header_names.isdisjoint(map(_name_of, headers)):
            rid = self._read_headers(headers, timed)
        self.rid = (rid is not None and sane_request_id(rid)) or (
            ID_POOL.pop() if ID_POOL else new_request_id()
        )
        when = _INF
        if timed:
            timeout = config.timeout
            if timeout is not None:
                when = arrival + timeout
                if config.timeout_is_urgent:
                    self.urgent = True
            if self.start_deadline < when:
                when = self.start_deadline
        self.deadline_at = when
        parent: Context = config.base
        if config.values is not None:
            for key, extra in config.values(hook_arg):
                parent = with_value(parent, key, extra)
        self.root = RootContext(parent, self, when)
        if recorder is not None and timed:  # (a websocket is not counted)
            recorder.started(self, hook_arg)

    def _read_headers(self, headers: Iterable[tuple[bytes, bytes]], timed: bool) -> bytes | None:
        """Note the headers we read (request id, budget, token, framing, forwarding
        chain); return the request id as sent."""
        rid = None
        budget = _INF
        start = None
        config = self.config
        roles = config.header_roles
        for name, value in headers:
            role = roles.get(name)
            if role is None:
                continue
            if role == _R_ID:
                if rid is None:
                    rid = value
            elif role == _R_BUDGET:
                ms = parse_budget_ms(value)
                if ms is not None and ms / 1000.0 < budget:
                    budget = ms / 1000.0  # several: the smallest budget wins
            elif role == _R_GRPC:
                seconds = parse_grpc_timeout(value)
                if seconds is not None and seconds < budget:
                    budget = seconds
            elif role == _R_TRACE:
                if self.traceparent is None and parse_traceparent(value) is not None:
                    self.traceparent = value.decode("ascii")
            elif role == _R_START:
                if start is None:
                    start = value
            elif role == _R_AUTH:
                self._auth = value
            elif role == _R_LENGTH:
                self._length = value
            elif role == _R_CHUNKED:
                self._chunked = True
            else:  # the forwarding header (read only with trusted proxies)
                if self._fwd is None:
                    self._fwd = []
                self._fwd.append(value)
        if budget != _INF:
            self.budget = budget
            self.budget_ms = int(budget * 1000)
        if start is not None:
            self._queue_time(start)
        if timed:
            began = self.arrival - self.queued
            if budget != _INF:
                self.header_deadline = began + budget
            cap = self.header_deadline
            if self.queued and config.timeout is not None:
                cap = min(cap, began + config.timeout)
            if cap != _INF:
                self.start_deadline = cap
                if cap - self.arrival <= config.disconnect_grace:
                    self.urgent = True
        if (
            config.request_id_from_traceparent
            and self.traceparent is not None
            and (rid is None or sane_request_id(rid) is None)
        ):
            rid = self.traceparent[3:35].encode("ascii")  # the trace id
        return rid

    def _queue_time(self, raw: bytes) -> None:
        """``X-Request-Start`` (read only with trusted proxies): believed only
        from a trusted peer, the wait since then counts against the budget."""
        peer = self._peer
        ip = parse_ip(peer) if peer is not None else None
        if ip is None or not any(ip in net for net in self.config.trusted_proxies):
            return
        began = parse_request_start(raw)
        if began is None:
            return
        queued = _wall() - began
        if 0 < queued <= MAX_QUEUE_SECONDS:  # (a proxy's clock ahead of ours: no queue)
            self.queued = queued

    @property
    def body_known_small(self) -> bool:
        """The body is known to be at most EAGER_BODY_LIMIT bytes (or absent)."""
        length = self._length
        if length is not None:
            length = length.strip()
            return length.isdigit() and len(length) <= 6 and int(length) <= EAGER_BODY_LIMIT
        # HTTP/1.x without framing headers: no body. HTTP/2: unknown.
        return not self._chunked and not self.body_may_stream

    def body_size(self) -> int | None:
        """The body's size as the headers declare it: 0 for none (HTTP/1.x
        without framing headers), the Content-Length, or None if unknown
        (chunked, an unframed HTTP/2 body, an invalid length)."""
        length = self._length
        if length is not None:
            length = length.strip()
            return int(length) if length.isdigit() and len(length) <= 18 else None
        return None if self._chunked or self.body_may_stream else 0

    # -- the values the root answers (RootContext's ValueSource) ---------------

    def get(self, key: Any, default: Any) -> Any:
        if key is REQUEST_ID:
            return self.request_id
        if key is CLIENT_IP:
            return self.client_ip()
        if key is AUTH_TOKEN:
            return self.token()
        if key is TRACEPARENT and self.traceparent is not None:
            return self.traceparent
        return default

    def key_names(self) -> list[str]:
        """The keys present, never their values (for ``str(ctx)``)."""
        names = ["request_id"]
        if self.client_ip() is not None:
            names.append("client_ip")
        if self.token() is not None:
            names.append("auth_token")
        if self.traceparent is not None:
            names.append("traceparent")
        return names

    @property
    def request_id(self) -> str:
        """The request id (REQUEST_ID), as a str."""
        rid = self._request_id
        if rid is None:
            rid = self._request_id = self.rid.decode("ascii")
        return rid

    def client_ip(self) -> str | None:
        ip = self._client_ip
        if ip is _UNSET:
            ip = self._peer
            if self._fwd is not None:
                config = self.config
                hops = forwarded_for_hops(self._fwd, config.forwarded_rfc7239)
                ip = resolve_client_ip(ip, hops, config.trusted_proxies)
            self._client_ip = ip
        return ip

    def token(self) -> Secret | None:
        token = self._token
        if token is _UNSET:
            token = self._token = None if self._auth is None else bearer_token(self._auth)
        return token

    # -- the deadline ------------------------------------------------------------

    def set_timeout(self, seconds: float | None) -> None:
        """Move the deadline to ``seconds`` after arrival (``None``: none); the
        caller's budget still caps it."""
        when = _INF if seconds is None else self.arrival - self.queued + seconds
        if self.header_deadline < when:
            when = self.header_deadline
        self.deadline_at = when
        self.urgent = when - _monotonic() <= self.config.disconnect_grace
        self.root.set_deadline(None if when == _INF else when)
        self.deadline_moved()

    def deadline_moved(self) -> None:
        """Adapter hook: the deadline was moved (a route's own timeout)."""

    def context_swapped(self, ctx: Context) -> None:
        """Adapter hook: ``set_request_context(ctx)`` made ``ctx`` the request's
        context (the adapter updates where it publishes it: ``request.state``)."""

    # -- the end -----------------------------------------------------------------

    def deadline_passed(self) -> bool:
        return isinstance(self.root.err(), DeadlineExceeded)

    def end(self, method: object, path: object) -> Outcome:
        """The app is done with the request: decide the outcome, log it (499 and
        deadlines only), end the root context. Call it with the root still
        bound as ``current()``, so log filters see the request id."""
        outcome = self.outcome = decide_outcome(self)
        if outcome is not Outcome.COMPLETED:
            status = self.status
            if outcome is Outcome.DEADLINE and (self.answered_timeout or not status):
                status = self.config.timeout_status
            log_outcome(outcome, method, path, status, self.request_id)
        if recorder is not None:
            recorder.ended(self, outcome, method, path)
        self.root.end()
        # The root keeps this request (its value source) for as long as the
        # app keeps the context; the request must not keep the root, or every
        # request would be a reference cycle left to the cyclic GC.
        del self.root
        return outcome


def request_of(ctx: Context) -> Request | None:
    """The request whose root ``ctx`` is, or derives from (through with_cancel,
    with_timeout and with_value; not through without_cancel), while it runs."""
    root = root_of(ctx)
    if root is None:
        return None
    source = root.source
    if not isinstance(source, Request) or source.outcome is not None:
        return None
    return source


def set_request_timeout(seconds: float | None) -> None:
    """Move the current request's deadline to ``seconds`` after its arrival.

    ``None`` removes the middleware's timeout (the caller's budget still
    applies). Raises ``RuntimeError`` outside a request served by the middleware.
    """
    if seconds is not None:
        seconds = positive_seconds(seconds, "timeout")
    request = request_of(current())
    if request is None:
        raise RuntimeError("set_request_timeout() needs a request served by ContextMiddleware")
    request.set_timeout(seconds)
