"""Integrations (logging, httpx, databases): they build on the core only (``.._core``)."""
