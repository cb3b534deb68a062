"""Integrations (logging, httpx, databases): they build on the core and the web adapters."""
