"""A live requests page, like Go's ``golang.org/x/net/trace`` ``/debug/requests``.

::

    from ctxmiddleware.debugpage import RequestsPage

    page = RequestsPage()
    app.mount("/debug/requests", page.asgi_app())          # Starlette, FastAPI
    # WSGI: DispatcherMiddleware(app, {"/debug/requests": page.wsgi_app()})

It shows, server-rendered (no JavaScript, no CDN; the page refreshes itself):

* the requests in flight, oldest first: method, route template, path, age,
  the remaining budget as a bar, request id, client IP, and what the request
  waits on now ("PostgreSQL transaction 2.1 s", "HTTP call to backend:8001",
  noted by the DB helpers and the httpx transports);
* per outcome, the count and the last ``history`` finished requests with
  their latency bucket (>= 0 s, >= 50 ms ... >= 100 s, as x/net/trace);
* a latency histogram per outcome, drawn as inline SVG.

Creating a page turns the statistics on (``ctxmiddleware.enable_stats()``)
with the detail the page needs (latencies, the last requests, waits).

Safe by default:

* it answers only clients connecting from a loopback address, and none
  whose request carries a forwarding header (a reverse proxy on the same
  host would otherwise make every client look local); ``allow`` adds
  networks (``["10.0.0.0/8"]``), ``allow=["0.0.0.0/0", "::/0"]`` everyone;
* it never shows header values (so no ``Authorization``, ``Cookie`` or
  bearer token), never a ``Secret``; query strings only with ``show_query``;
* the per-row "cancel" button is off unless ``cancel=True``: a POST carrying
  the page's CSRF token (and, if the browser sends one, a same-origin
  ``Origin``) cancels the request's context with the cause
  :class:`OperatorCancelled`; the request is counted as ``server_shutdown``
  (a cancellation from outside the app).
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._request import (
    LATENCY_BUCKETS,
    Finished,
    InFlight,
    Outcome,
    Recorder,
    Request,
    enable_stats,
)

__all__ = ["OperatorCancelled", "RequestsPage"]

_FORWARDING = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
_OUTCOME_COLORS = {
    Outcome.COMPLETED: "#2e7d32",
    Outcome.CLIENT_DISCONNECTED: "#ef6c00",
    Outcome.DEADLINE: "#c62828",
    Outcome.SERVER_SHUTDOWN: "#6a1b9a",
    Outcome.ERROR: "#424242",
}


class OperatorCancelled(Exception):
    """The cause of a request cancelled from the live requests page
    (``ctxmiddleware.cause(ctx)``): an operator pressed "cancel"."""

    def __init__(self, message: str = "cancelled by an operator from the requests page") -> None:
        super().__init__(message)


def _bucket_label(lower: float) -> str:
    if lower == 0:
        return "≥ 0 s"
    if lower < 1:
        return f"≥ {lower * 1000:.0f} ms"
    return f"≥ {lower:g} s"


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 100:
        return f"{value:.1f} s"
    return f"{value:.0f} s"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:18px;margin:0 0 .3em}h2{font-size:15px;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin-bottom:.6em}
th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px}.muted{color:#777}
.bar{display:inline-block;width:120px;height:10px;background:#eee;border:1px solid #bbb;
vertical-align:middle;margin-right:6px}.bar i{display:block;height:100%}
.counts span{display:inline-block;margin-right:1.2em;padding:2px 8px;border-radius:3px;
color:#fff}
form{display:inline}button{font-size:11px}
"""


class RequestsPage:
    """The live requests page (see the module's documentation).

    ``allow``: networks (CIDR strings) allowed besides loopback;
    ``show_query``: show query strings; ``cancel``: a "cancel" button per
    request in flight; ``history``: finished requests kept per outcome;
    ``refresh``: seconds between the page's reloads (0: never).
    """

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        show_query: bool = False,
        cancel: bool = False,
        history: int = 10,
        refresh: float = 2.0,
    ) -> None:
        self.networks = [ipaddress.ip_network(net, strict=False) for net in allow]
        self.show_query = show_query
        self.cancel = cancel
        self.refresh = refresh
        self.csrf = secrets.token_urlsafe(24)
        self.recorder: Recorder = enable_stats(history)
        if self.recorder.history < history:
            self.recorder.history = history
        self.recorder.set_detail(True)

    # -- who may see it ------------------------------------------------------

    def allowed(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether a client connecting from ``peer`` with ``headers`` may see the page."""
        if peer is None:
            return False
        try:
            ip = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        if any(ip in net for net in self.networks):
            return True
        if not ip.is_loopback:
            return False
        # A reverse proxy on this host makes every client look local.
        return not any(name.lower() in _FORWARDING for name, _ in headers)

    # -- the page ----------------------------------------------------------------

    def render(self, base: str = "") -> str:
        """The page's HTML (``base``: the URL path the page is mounted at)."""
        rec = self.recorder
        snap = rec.snapshot()
        live = rec.in_flight(with_query=self.show_query)
        recent = rec.recent()
        refresh = (
            f'<meta http-equiv="refresh" content="{self.refresh:g}">' if self.refresh > 0 else ""
        )
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            refresh,
            "<title>requests · ctxmiddleware</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>/debug/requests</h1>",
            f"<p class='muted'>{len(live)} in flight · as of "
            f"{_e(time.strftime('%H:%M:%S'))} · "
            + (f"refreshes every {self.refresh:g} s" if self.refresh > 0 else "no auto-refresh")
            + "</p>",
            "<div class='counts' id='counts'>",
        ]
        for outcome in Outcome:
            out.append(
                f"<span style='background:{_OUTCOME_COLORS[outcome]}' "
                f"data-outcome='{outcome.value}'>{_e(outcome.value)}: "
                f"{snap.outcomes[outcome.value]}</span>"
            )
        out.append("</div>")
        out += self._in_flight(live, base)
        out.append("<h2>Latency (finished requests)</h2>")
        out.append(self._histogram(snap.latency))
        out += self._finished(recent, snap.latency)
        cancels = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(snap.downstream_cancels.items()))
        work = snap.work_stopped
        out.append(
            f"<p class='muted'>Downstream cancels sent: {cancels or 'none'} · work stopped: "
            f"{work.count} cancelled requests had {_seconds(work.sum)} of budget left"
            f" ({work.no_deadline} without a deadline)</p>"
        )
        out.append("</body></html>")
        return "".join(out)

    def _in_flight(self, live: list[tuple[Request, InFlight]], base: str) -> list[str]:
        out = ["<h2>In flight</h2>"]
        if not live:
            return [*out, "<p class='muted' id='in-flight-empty'>none</p>"]
        cols = ["method", "route", "path", "age", "budget left", "request id", "client",
                "waiting on"]
        if self.cancel:
            cols.append("")
        out.append("<table id='in-flight'><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
        for _, row in live:
            path = row.path + (f"?{row.query}" if row.query else "")
            out.append(f"<tr data-request-id='{_e(row.request_id)}'>")
            out.append(f"<td>{_e(row.method)}</td><td><code>{_e(row.route)}</code></td>")
            out.append(f"<td><code>{_e(path)}</code></td><td class='n'>{_seconds(row.age)}</td>")
            out.append(f"<td>{self._bar(row)}</td><td><code>{_e(row.request_id)}</code></td>")
            out.append(f"<td>{_e(row.client_ip or '')}</td><td>")
            out.append("<br>".join(f"{_e(what)} {_seconds(age)}" for what, age in row.waiting))
            out.append("</td>")
            if self.cancel:
                out.append(
                    f"<td><form method='post' action='{_e(base or '.')}'>"
                    f"<input type='hidden' name='csrf' value='{_e(self.csrf)}'>"
                    f"<input type='hidden' name='rid' value='{_e(row.request_id)}'>"
                    "<button type='submit'>cancel</button></form></td>"
                )
            out.append("</tr>")
        out.append("</table>")
        return out

    @staticmethod
    def _bar(row: InFlight) -> str:
        if row.remaining is None or not row.budget:
            return "<span class='muted'>no deadline</span>"
        left = max(0.0, row.remaining)
        share = min(1.0, left / row.budget) if row.budget > 0 else 0.0
        color = "#2e7d32" if share > 0.5 else "#f9a825" if share > 0.2 else "#c62828"
        return (
            f"<span class='bar' title='{left:.2f} s of {row.budget:.2f} s'>"
            f"<i style='width:{share * 100:.0f}%;background:{color}'></i></span>"
            f"{_seconds(left)}"
        )

    @staticmethod
    def _histogram(latency: dict[str, tuple[int, ...]]) -> str:
        """Requests per latency bucket, one bar group per bucket, one bar per outcome."""
        width, height, pad = 640, 150, 24
        slot = (width - pad) / len(LATENCY_BUCKETS)
        bar = slot / (len(Outcome) + 1)
        most = max([1, *(n for counts in latency.values() for n in counts)])
        scale = math.log1p(most)
        parts = [
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 20}'"
            f" role='img' aria-label='latency histogram' id='latency-histogram'>"
        ]
        for b, lower in enumerate(LATENCY_BUCKETS):
            x0 = pad + b * slot
            parts.append(
                f"<text x='{x0 + slot / 2:.0f}' y='{height + 14}' font-size='10' "
                f"text-anchor='middle'>{_e(_bucket_label(lower))}</text>"
            )
            for k, outcome in enumerate(Outcome):
                n = latency.get(outcome.value, (0,) * len(LATENCY_BUCKETS))[b]
                if not n:
                    continue
                h = max(1.0, (height - 10) * math.log1p(n) / scale)
                parts.append(
                    f"<rect x='{x0 + k * bar:.1f}' y='{height - h:.1f}' width='{bar - 1:.1f}' "
                    f"height='{h:.1f}' fill='{_OUTCOME_COLORS[outcome]}'>"
                    f"<title>{_e(outcome.value)} {_e(_bucket_label(lower))}: {n}</title></rect>"
                )
        parts.append(
            f"<line x1='{pad}' y1='{height}' x2='{width}' y2='{height}' stroke='#999'/></svg>"
        )
        return "".join(parts)

    def _finished(
        self, recent: dict[Outcome, list[Finished]], latency: dict[str, tuple[int, ...]]
    ) -> list[str]:
        out = ["<h2>Finished</h2>"]
        head = "".join(f"<th>{_e(_bucket_label(b))}</th>" for b in LATENCY_BUCKETS)
        out.append(f"<table id='buckets'><tr><th>outcome</th>{head}</tr>")
        for outcome in Outcome:
            counts = latency.get(outcome.value, (0,) * len(LATENCY_BUCKETS))
            cells = "".join(f"<td class='n'>{n}</td>" for n in counts)
            out.append(f"<tr><td>{_e(outcome.value)}</td>{cells}</tr>")
        out.append("</table>")
        for outcome in Outcome:
            rows = recent.get(outcome, [])
            out.append(
                f"<h2 id='finished-{outcome.value}'>{_e(outcome.value)} "
                f"<span class='muted'>(last {len(rows)})</span></h2>"
            )
            if not rows:
                continue
            out.append(
                f"<table class='finished' data-outcome='{outcome.value}'><tr><th>ended</th>"
                "<th>method</th><th>route</th><th>path</th><th>latency</th><th>bucket</th>"
                "<th>status</th><th>budget left</th><th>request id</th><th>client</th></tr>"
            )
            for f in rows:
                bucket = max(b for b in LATENCY_BUCKETS if b <= f.latency)
                left = "" if f.remaining is None else _seconds(f.remaining)
                out.append(
                    f"<tr data-request-id='{_e(f.request_id)}'>"
                    f"<td>{_e(time.strftime('%H:%M:%S', time.localtime(f.ended_at)))}</td>"
                    f"<td>{_e(f.method)}</td><td><code>{_e(f.route)}</code></td>"
                    f"<td><code>{_e(f.path)}</code></td><td class='n'>{_seconds(f.latency)}</td>"
                    f"<td>{_e(_bucket_label(bucket))}</td><td>{f.status or ''}</td>"
                    f"<td>{left}</td><td><code>{_e(f.request_id)}</code></td>"
                    f"<td>{_e(f.client_ip or '')}</td></tr>"
                )
            out.append("</table>")
        return out

    # -- cancel ----------------------------------------------------------------------

    def cancel_request(self, request_id: str) -> bool:
        """Cancel the request in flight with id ``request_id`` (cause
        :class:`OperatorCancelled`); False if there is none."""
        for request, row in self.recorder.in_flight():
            if row.request_id == request_id:
                root = getattr(request, "root", None)
                if root is None:
                    return False
                request.cancelled_from_outside = True  # counted as server_shutdown
                root.cancel(OperatorCancelled())
                return True
        return False

    def _post(self, body: bytes, origin: str | None, host: str | None) -> tuple[int, str]:
        if not self.cancel:
            return 405, "cancelling is off (RequestsPage(cancel=True))"
        if origin is not None and host is not None and urllib.parse.urlsplit(origin).netloc != host:
            return 403, "cross-origin request refused"
        form = urllib.parse.parse_qs(body.decode("latin-1"))
        token = (form.get("csrf") or [""])[0]
        if not secrets.compare_digest(token.encode(), self.csrf.encode()):
            return 403, "bad CSRF token"
        rid = (form.get("rid") or [""])[0]
        if not self.cancel_request(rid):
            return 404, "no such request in flight"
        return 303, ""

    # -- ASGI ----------------------------------------------------------------------

    def asgi_app(self) -> Callable[..., Any]:
        """The page as an ASGI app (mount it where you like)."""

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            client = scope.get("client")
            headers = scope.get("headers", [])
            base = scope.get("root_path", "") + "/"
            if not self.allowed(client[0] if client else None, headers):
                await _asgi_answer(send, 403, "text/plain", b"forbidden\n")
                return
            method = scope.get("method", "GET")
            if method == "POST":
                body = b""
                while True:
                    message = await receive()
                    body += message.get("body", b"")
                    if len(body) > 8192:
                        await _asgi_answer(send, 413, "text/plain", b"too large\n")
                        return
                    if not message.get("more_body"):
                        break
                hdrs = {k.lower(): v.decode("latin-1") for k, v in headers}
                status, text = self._post(body, hdrs.get(b"origin"), hdrs.get(b"host"))
                location = base if status == 303 else None
                await _asgi_answer(send, status, "text/plain", text.encode(), location=location)
                return
            if method not in ("GET", "HEAD"):
                await _asgi_answer(send, 405, "text/plain", b"GET or POST\n")
                return
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if query.get("format") == ["json"]:
                body = json.dumps(self.recorder.snapshot().as_dict()).encode()
                await _asgi_answer(send, 200, "application/json", body)
                return
            await _asgi_answer(
                send, 200, "text/html; charset=utf-8", self.render(base).encode("utf-8")
            )

        return app

    # -- WSGI ------------------------------------------------------------------------

    def wsgi_app(self) -> Callable[[dict[str, Any], Any], Iterator[bytes] | list[bytes]]:
        """The page as a WSGI app."""

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            headers = [
                (k[5:].replace("_", "-").lower().encode("latin-1"), b"")
                for k in environ
                if k.startswith("HTTP_")
            ]
            base = environ.get("SCRIPT_NAME", "") + "/"
            if not self.allowed(environ.get("REMOTE_ADDR"), headers):
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [b"forbidden\n"]
            method = environ.get("REQUEST_METHOD", "GET")
            if method == "POST":
                try:
                    size = int(environ.get("CONTENT_LENGTH") or 0)
                except ValueError:
                    size = 0
                if size > 8192:
                    start_response("413 Content Too Large", [("Content-Type", "text/plain")])
                    return [b"too large\n"]
                body = environ["wsgi.input"].read(size) if size else b""
                status, text = self._post(
                    body, environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST")
                )
                extra = [("Location", base)] if status == 303 else []
                start_response(
                    f"{status} {_REASONS.get(status, '')}", [("Content-Type", "text/plain"), *extra]
                )
                return [text.encode()]
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            if query.get("format") == ["json"]:
                start_response("200 OK", [("Content-Type", "application/json")])
                return [json.dumps(self.recorder.snapshot().as_dict()).encode()]
            start_response(
                "200 OK",
                [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")],
            )
            return [self.render(base).encode("utf-8")]

        return app


_REASONS = {303: "See Other", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


async def _asgi_answer(
    send: Any, status: int, content_type: str, body: bytes, location: str | None = None
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; "
         b"img-src data:; form-action 'self'"),
    ]
    if location is not None:
        headers.append((b"location", location.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
