"""The WSGI adapter: WSGIContextMiddleware for Flask, Django and any WSGI app.

It imports the request layer and the core only (never their private names).
The Flask and Django integrations (``ctxmiddleware.flask``,
``ctxmiddleware.django``) build on the names exported here.
"""

from ._environ import EnvironHeaders, client_probe
from ._exchange import ENVIRON_KEY, WsgiRequest
from ._middleware import WSGIContextMiddleware
from ._watcher import Watcher, watcher

__all__ = [
    "ENVIRON_KEY",
    "EnvironHeaders",
    "WSGIContextMiddleware",
    "Watcher",
    "WsgiRequest",
    "client_probe",
    "watcher",
]
