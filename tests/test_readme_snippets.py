"""The README's Python snippets cannot rot: each one compiles, and the
self-contained ones (an app with no database) run in process."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_compiles(index: int) -> None:
    # (top-level await: the helper snippets show the inside of a handler)
    compile(BLOCKS[index], f"README.md block {index}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_request_value_snippet_runs() -> None:
    block = next(b for b in BLOCKS if "with_request_value(USER" in b)
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/me")

    response = asyncio.run(go())
    assert response.json() == {"user": "ada", "same": "ada"}
