"""The ASGI adapter: ContextMiddleware for Starlette, FastAPI and any ASGI app.

It imports the request layer and the core only (never their private names);
``_fastapi`` is imported lazily by the package, as it needs FastAPI.
"""

from ._middleware import ContextMiddleware, route_timeout

__all__ = ["ContextMiddleware", "route_timeout"]
