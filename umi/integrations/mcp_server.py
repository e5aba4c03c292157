"""umi as an MCP server, over the official ``mcp`` SDK (``pip install 'umi[mcp]'``).

``umi mcp`` runs it (stdio by default, streamable HTTP with ``--http HOST:PORT``);
:func:`build_server` gives the :class:`mcp.server.mcpserver.MCPServer` to embed elsewhere.

Tools: ``remember``, ``recall``, ``get``, ``forget``, ``history`` (archival memory) and
``core_read``, ``core_set_block``, ``core_remove_block`` (the always-in-prompt core memory,
within its byte budget). Resources: ``umi://core`` (the rendered core memory) and
``umi://core/{name}`` (one block's text).

Scope: the server is bound to the ``user_id`` / ``agent_id`` it was started with (either may
be unset). Every tool also takes ``user_id`` / ``agent_id``: a call may fill in what the
server left unset, never change what it bound (a client of a server started for Alice
cannot read Bob's memory). With nothing bound and nothing passed, the call sees the whole
store (the admin view).

Errors: argument types are checked by the SDK against each tool's JSON schema; values are
checked by umi. Every :class:`umi.UmiError` (and ``TypeError``) a call raises comes back as an
MCP tool error (``isError: true``) whose text is the error's class and message; the server
keeps serving. Anything else is a bug: the SDK logs it and answers a generic tool error.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import ipaddress
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import Field, Strict, StrictBool, StrictInt

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError

from ..errors import InvalidFilterError, UmiError, ValidationError

if TYPE_CHECKING:
    from ..memory import Memory

__all__ = ["build_server", "serve_stdio", "serve_http", "parse_http_address", "SERVER_NAME"]

SERVER_NAME = "umi"
F = TypeVar("F", bound=Callable[..., Any])

INSTRUCTIONS = """\
umi is this agent's long-term memory.
- `remember` stores what you are told (facts are extracted, deduplicated, and linked to the
  facts they update); `recall` finds current facts for a question (best first);
  `get` / `history` / `forget` work on one fact by id.
- The core memory (`core_read`, `core_set_block`, `core_remove_block`, resource umi://core)
  is a few named text blocks always worth keeping in the prompt, within a byte budget.
Times are ISO-8601 strings or integer milliseconds since the Unix epoch."""

UserId = Annotated[str | None, Field(
    description="Whose memory: fills in the server's user when it has none; must match it otherwise.")]
AgentId = Annotated[str | None, Field(
    description="Which agent's memory: fills in the server's agent when it has none; must match it otherwise.")]
# Strict: the SDK validates in pydantic's lax mode, which reads a JSON true as 1 (and "2" as 2, "no" as
# false); umi's own API takes no bool for a number and no str for an int or a bool.
Number = Annotated[float, Strict()]  # a JSON int or float, never a bool or a string
TimeBound = Annotated[StrictInt | str | None, Field(  # StrictInt: a JSON true is no time
    description="ISO-8601 time (e.g. 2026-01-31 or 2026-01-31T09:00:00Z; no zone = UTC) "
                "or integer milliseconds since the Unix epoch.")]


def _tool(fn: F) -> F:
    """Turn a umi error into an MCP tool error carrying its class and message."""

    def refuse(exc: Exception) -> ToolError:
        return ToolError(f"{type(exc).__name__}: {exc}")

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def arun(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except (UmiError, TypeError) as exc:
                raise refuse(exc) from exc
        return arun  # type: ignore[return-value]

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UmiError, TypeError) as exc:
            raise refuse(exc) from exc
    return run  # type: ignore[return-value]


def parse_time(value: int | str | None, what: str) -> int | None:
    """An ISO-8601 string (no zone = UTC) or integer ms -> ms since the epoch."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip()
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidFilterError(
            f"{what} must be an ISO-8601 time (e.g. 2026-01-31T09:00:00Z) or integer milliseconds, "
            f"got {value!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _entity(e: Any) -> dict[str, Any]:
    """A fact as a client sees it: everything but the embedding (scope and mentions included)."""
    d: dict[str, Any] = e.to_dict()
    return d


#: how many scoped views (one per user id / agent id pair a call names) the server keeps
VIEWS_MAX = 256


class _Views:
    """The memory a call works on: the server's bound scope, narrowed by the call's."""

    def __init__(self, memory: Memory, user_id: str | None, agent_id: str | None) -> None:
        self.memory = memory
        self.user_id = user_id
        self.agent_id = agent_id
        #: the scoped views made for calls, most recently used last (at most VIEWS_MAX: a view is
        #: cheap to make again, and a client sending many user ids must not grow the server)
        self._views: OrderedDict[tuple[str | None, str | None], Memory] = OrderedDict()
        # The bound scope is the server's own view (validated here: a bad --user fails at start).
        self.view(None, None)

    def view(self, user_id: str | None, agent_id: str | None) -> Memory:
        user = self._merge("user_id", self.user_id, user_id)
        agent = self._merge("agent_id", self.agent_id, agent_id)
        key = (user, agent)
        view = self._views.get(key)
        if view is None:
            if user is None and agent is None:
                view = self.memory
            else:
                view = self.memory.scoped(user_id=user, agent_id=agent)
            self._views[key] = view
            if len(self._views) > VIEWS_MAX:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(key)
        return view

    @staticmethod
    def _merge(what: str, bound: str | None, asked: str | None) -> str | None:
        if asked is None or asked == bound:
            return bound
        if bound is not None:
            raise ValidationError(
                f"this server is bound to {what} {bound!r}; a call cannot use {what} {asked!r}")
        return asked


class _Server(MCPServer):
    """Lists one ``umi://core/{name}`` resource per core block there is now (they come and go)."""

    def __init__(self, views: _Views, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._umi_views = views

    async def list_resources(self) -> list[Any]:
        from mcp.types import Resource

        listed = await super().list_resources()
        core = self._umi_views.view(None, None).core
        for label in core.labels():
            listed.append(Resource(uri=f"umi://core/{label}", name=f"core-block-{label}",
                                   mime_type="text/plain",
                                   description=f"The core-memory block {label!r}."))
        return listed


def build_server(memory: Memory, *, user_id: str | None = None, agent_id: str | None = None,
                 name: str = SERVER_NAME) -> MCPServer:
    """An MCP server over ``memory``, bound to ``user_id`` / ``agent_id`` when given.

    The caller keeps ownership of ``memory`` (close it after the server stops).
    """
    from .. import __version__
    from ..options import RecallOptions, RememberOptions
    from ..types import EntityType

    views = _Views(memory, user_id, agent_id)
    # Sync tools run on worker threads; a core write is a store write then an arena write, so
    # concurrent clients take turns (the store and the arena then agree on the order of writes).
    core_lock = threading.Lock()
    server = _Server(views, name, version=__version__, instructions=INSTRUCTIONS,
                     log_level="WARNING")

    @server.tool(description="Store what you were told. Facts are extracted from the text, "
                             "deduplicated, and linked to the facts they update or contradict.")
    @_tool
    async def remember(
        text: Annotated[str, Field(description="What to remember, in plain language.")],
        importance: Annotated[Number, Field(description="0..1, how much it matters.")] = 0.5,
        extract: Annotated[StrictBool, Field(
            description="false stores the text as one note, without extracting facts.")] = True,
        event_time: Annotated[TimeBound, Field(description="When it happened, if not now.")] = None,
        metadata: Annotated[dict[str, str | int | float | bool] | None, Field(
            description="Flat key/value tags stored with the facts.")] = None,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        view = views.view(user_id, agent_id)
        opts = RememberOptions(importance=importance, metadata=metadata,
                               event_time=parse_time(event_time, "event_time"))
        if not extract:
            opts = opts.without_extraction()
        r = await view.remember(text, opts)
        return {
            "entities": [_entity(e) for e in r.entities],
            "evolutions": [ev.to_dict() for ev in r.evolutions],
            "duplicate": bool(getattr(r, "duplicate", False)),
            "warnings": list(r.warnings),
        }

    @server.tool(description="Find the current facts relevant to a question, best first.")
    @_tool
    async def recall(
        query: Annotated[str, Field(description="A question or keywords.")],
        limit: Annotated[StrictInt, Field(description="How many facts at most.")] = 10,
        entity_types: Annotated[list[str] | None, Field(
            description="Only these kinds: self, person, organization, project, topic, "
                        "location, event, note, task.")] = None,
        time_start: Annotated[TimeBound, Field(description="Only facts stored at or after this time.")] = None,
        time_end: Annotated[TimeBound, Field(description="Only facts stored at or before this time.")] = None,
        include_superseded: Annotated[StrictBool, Field(
            description="Also return facts that later facts replaced.")] = False,
        as_of: Annotated[TimeBound, Field(
            description="Answer as of this past time (the facts that were current then).")] = None,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        view = views.view(user_id, agent_id)
        start, end = parse_time(time_start, "time_start"), parse_time(time_end, "time_end")
        opts = RecallOptions(
            limit=limit,
            entity_types=tuple(EntityType.parse(t) for t in entity_types) if entity_types is not None else None,
            time_range=(start, end) if start is not None or end is not None else None,
            include_superseded=include_superseded,
            as_of=parse_time(as_of, "as_of"),
        )
        hits = await view.recall(query, opts)
        out: dict[str, Any] = {"facts": [_entity(e) for e in hits]}
        warnings = getattr(hits, "warnings", ())
        if warnings:
            out["warnings"] = list(warnings)
        return out

    @server.tool(description="One fact by id (null when there is none in this scope).")
    @_tool
    async def get(
        entity_id: Annotated[str, Field(description="The fact's id, as remember/recall returned it.")],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        e = await views.view(user_id, agent_id).get(entity_id)
        return {"fact": None if e is None else _entity(e)}

    @server.tool(description="Forget one fact everywhere, with the other facts of the same statement. "
                             "What it alone had replaced is current again.")
    @_tool
    async def forget(
        entity_id: Annotated[str, Field(description="The fact's id.")],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        return {"forgotten": bool(await views.view(user_id, agent_id).forget(entity_id))}

    @server.tool(description="Every change to one fact, oldest first.")
    @_tool
    async def history(
        entity_id: Annotated[str, Field(description="The fact's id.")],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        records = await views.view(user_id, agent_id).history(entity_id)
        return {"history": [{"seq": h.seq, "op": h.op, "at": h.at, "snapshot": dict(h.snapshot)}
                            for h in records]}

    @server.tool(description="The core memory as the prompt sees it, with its byte budget.")
    @_tool
    def core_read(
        format: Annotated[Literal["xml", "markdown"], Field(description="Rendering.")] = "xml",
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        core = views.view(user_id, agent_id).core
        with core_lock:
            return {"rendered": core.render(format), "blocks": core.labels(),
                    "used_bytes": core.used_bytes, "max_bytes": core.max_bytes}

    @server.tool(description="Set one core-memory block (replacing its text), within the byte budget.")
    @_tool
    def core_set_block(
        name: Annotated[str, Field(description="Block name: system, persona, human, facts, goals, "
                                               "scratch, or your own ([A-Za-z0-9_.-], 1-64 bytes).")],
        content: Annotated[str, Field(description="The block's whole new text.")],
        importance: Annotated[Number, Field(description="0..1.")] = 0.5,
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        core = views.view(user_id, agent_id).core
        with core_lock:
            core.set_block(name, content, importance=importance)
            return {"blocks": core.labels(), "used_bytes": core.used_bytes, "max_bytes": core.max_bytes}

    @server.tool(description="Remove one core-memory block.")
    @_tool
    def core_remove_block(
        name: Annotated[str, Field(description="Block name.")],
        user_id: UserId = None,
        agent_id: AgentId = None,
    ) -> dict[str, Any]:
        core = views.view(user_id, agent_id).core
        with core_lock:
            return {"removed": bool(core.remove_block(name)), "blocks": core.labels()}

    @server.resource("umi://core", name="core-memory", mime_type="application/xml",
                     description="The core memory of this server's scope, rendered as XML.")
    def core_resource() -> str:
        with core_lock:
            return views.view(None, None).core.render("xml")

    @server.resource("umi://core/{name}", name="core-block", mime_type="text/plain",
                     description="The text of one core-memory block of this server's scope.")
    def core_block_resource(name: str) -> str:
        core = views.view(None, None).core
        try:
            text = core.get_block(name)
        except (UmiError, TypeError) as exc:
            raise ResourceError(f"{type(exc).__name__}: {exc}") from exc
        if text is None:
            raise ResourceNotFoundError(f"no core-memory block named {name!r}; blocks: {core.labels()}")
        return text

    return server


async def serve_stdio(server: MCPServer) -> None:
    """Serve on stdin/stdout until the client closes stdin."""
    await server.run_stdio_async()


def parse_http_address(value: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); the host defaults to loopback."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValidationError(f"--http wants [HOST:]PORT, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValidationError(f"--http port must be 0..65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_http(server: MCPServer, host: str, port: int, *,
                     announce: Callable[[str], None] | None = None) -> None:
    """Serve streamable HTTP at ``http://host:port/mcp`` (port 0 picks a free one).

    ``announce`` gets the URL once the socket is bound and listening (``umi mcp`` prints it on stderr).
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UmiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    # listening before the URL is announced: a client that connects while uvicorn is still starting
    # waits in the backlog instead of being refused (seen on a loaded machine)
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    if announce is not None:
        announce(f"http://{shown}:{bound_port}/mcp")
    try:
        await http.serve(sockets=[sock])
    finally:
        sock.close()


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
