"""``python -m example_app``: serve the demo on http://127.0.0.1:8000
(``--wsgi``: the same endpoints through Flask under gunicorn)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

import ctxmiddleware


def main() -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ctxmiddleware.RequestContextFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s [%(request_id)s %(client_ip)s] %(message)s")
    )
    for name in ("example_app", "ctxmiddleware"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if "--wsgi" in sys.argv[1:]:  # the same demo through Flask under gunicorn
        from .wsgi import serve

        serve(os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000")))
        return
    uvicorn.run(
        "example_app.app:app",
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        # ContextMiddleware decides which proxies to trust (TRUSTED_PROXIES).
        proxy_headers=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
