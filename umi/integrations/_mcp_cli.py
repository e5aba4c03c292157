"""``umi mcp``: the command-line face of :mod:`umi.integrations.mcp_server`.

Kept apart from the server module so that ``umi --help`` never imports the MCP SDK.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

__all__ = ["add_parser", "cmd_mcp"]


def add_parser(sub: Any) -> None:
    m = sub.add_parser(
        "mcp", help="serve this memory to MCP clients (stdio; streamable HTTP with --http)",
        description="Serve umi over the Model Context Protocol: tools remember, recall, get, "
                    "forget, history, core_read, core_set_block, core_remove_block; resources "
                    "umi://core and umi://core/{name}. stdio by default.")
    where = m.add_mutually_exclusive_group()
    where.add_argument("--db", default="umi.duckdb",
                       help="DuckDB file (default: ./umi.duckdb), local embedder")
    where.add_argument("--postgres", default=None, metavar="URL",
                       help="a shared PostgreSQL + pgvector store (pip install 'umi[postgres]'), "
                            "local embedder")
    where.add_argument("--sim", action="store_true",
                       help="a deterministic in-memory Sim memory (tests, demos: nothing is saved)")
    m.add_argument("--seed", type=int, default=42, help="seed of the --sim memory")
    m.add_argument("--user", default=None, metavar="USER_ID",
                   help="bind the server to this user's memory (calls cannot change it)")
    m.add_argument("--agent", default=None, metavar="AGENT_ID",
                   help="bind the server to this agent's memory (calls cannot change it)")
    m.add_argument("--http", default=None, metavar="[HOST:]PORT",
                   help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
                        "(host defaults to 127.0.0.1; port 0 picks a free one)")
    m.set_defaults(fn=cmd_mcp)


def cmd_mcp(args: argparse.Namespace, out: TextIO) -> int:
    try:
        import anyio

        from . import mcp_server
    except ImportError as exc:
        sys.stderr.write(f"umi: error: `umi mcp` needs the MCP SDK ({exc}); "
                         "install it with: pip install 'umi[mcp]'\n")
        return 2
    from ..memory import Memory

    address = mcp_server.parse_http_address(args.http) if args.http is not None else None
    if args.sim:
        memory = Memory.sim(seed=args.seed)
    elif args.postgres is not None:
        memory = Memory.with_postgres(args.postgres)
    else:
        memory = Memory(args.db)
    try:
        server = mcp_server.build_server(memory, user_id=args.user, agent_id=args.agent)
        if address is None:
            anyio.run(mcp_server.serve_stdio, server)
        else:
            host, port = address
            if not mcp_server.is_loopback(host):
                sys.stderr.write(f"umi mcp: warning: listening on {host}, beyond this machine; "
                                 "the server has no authentication of its own\n")

            def announce(url: str) -> None:
                sys.stderr.write(f"umi mcp: serving {url}\n")
                sys.stderr.flush()

            anyio.run(lambda: mcp_server.serve_http(server, host, port, announce=announce))
    except KeyboardInterrupt:
        pass
    finally:
        memory.close()
    return 0
