"""The framework-neutral request layer: options, header parsing, values,
deadline and outcome of one request, shared by the ASGI and WSGI adapters.

It imports only the core. The adapters import from here only.
"""

from ._active import request_id, set_request_context, with_request_value
from ._config import (
    HeaderRole,
    RequestConfig,
    RequestIdFactory,
    RequestIdValidator,
    RequestOptions,
    ValuesHook,
    positive_seconds,
)
from ._headers import escape_for_log, new_request_id, sane_request_id
from ._ids import CustomRequestId
from ._outcome import Outcome, decide_outcome, log_outcome
from ._request import EAGER_BODY_LIMIT, Request, request_of, set_request_timeout
from ._stats import (
    LATENCY_BUCKETS,
    REMAINING_BUCKETS,
    BudgetHistogram,
    Finished,
    InFlight,
    Recorder,
    Stats,
    active_recorder,
    cause_name,
    disable_stats,
    enable_stats,
    set_route,
    stats,
)

__all__ = [
    "CustomRequestId",
    "RequestIdFactory",
    "RequestIdValidator",
    "EAGER_BODY_LIMIT",
    "HeaderRole",
    "Outcome",
    "Request",
    "RequestConfig",
    "RequestOptions",
    "ValuesHook",
    "decide_outcome",
    "escape_for_log",
    "log_outcome",
    "new_request_id",
    "positive_seconds",
    "request_id",
    "request_of",
    "sane_request_id",
    "set_request_context",
    "set_request_timeout",
    "with_request_value",
]

# Statistics (issue 11).
__all__ += [
    "LATENCY_BUCKETS",
    "REMAINING_BUCKETS",
    "BudgetHistogram",
    "Finished",
    "InFlight",
    "Recorder",
    "Stats",
    "active_recorder",
    "cause_name",
    "disable_stats",
    "enable_stats",
    "set_route",
    "stats",
]
