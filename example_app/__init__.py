"""A small Starlette service showing ctxmiddleware at work (``make run``)."""
