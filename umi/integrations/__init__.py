"""Adapters that put umi inside agent frameworks. Each is an optional extra, imported on use.

* :mod:`umi.integrations.mcp_server` — ``umi mcp``: an MCP server (``pip install 'umi[mcp]'``).
* :mod:`umi.integrations.langgraph` — :class:`UmiStore`, a LangGraph ``BaseStore``
  (``pip install 'umi[langgraph]'``).

Nothing here is imported by ``import umi``.
"""

from __future__ import annotations

__all__: list[str] = []
