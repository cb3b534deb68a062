"""Web adapters: the ASGI middleware and what it puts in a request's context."""
