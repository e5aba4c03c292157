"""`umi mcp`, driven through the MCP SDK's own client: over stdio and over streamable HTTP.

The server runs as a subprocess (`python -m umi.cli mcp --sim`: the deterministic in-memory Sim
memory, so no model weights, no network, and every run gives the same ids). Each transport
plays one user story: list tools, remember, recall (the fact comes back), set a core block, read
the core resources, get, history, forget (the fact is gone), then a dozen malformed calls that
each come back as a tool error naming the umi error, while the server keeps answering. One more
test runs the embedded default (a DuckDB file, the local embedder) across server restarts.
"""

from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed")

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

import umi  # noqa: E402
from child_process import child_env  # noqa: E402

# `python -m` puts the working directory first on sys.path: run the server outside the repo so a
# checkout's uncompiled umi/ never shadows the package under test
SERVER_CWD = tempfile.gettempdir()
TOOLS = {"remember", "recall", "get", "forget", "history",
         "core_read", "core_set_block", "core_remove_block"}


def server_env() -> dict[str, str]:
    env = child_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NUMBA_NUM_THREADS", "1")
    return env


def umi_mcp(*args: str) -> list[str]:
    where = () if "--db" in args else ("--sim",)
    return [sys.executable, "-m", "umi.cli", "mcp", *where, *args]


@asynccontextmanager
async def stdio_client(*args: str) -> AsyncIterator[Client]:
    cmd = umi_mcp(*args)
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=server_env(), cwd=SERVER_CWD)
    async with Client(params, read_timeout_seconds=120) as client:
        yield client


@contextmanager
def http_server(*args: str) -> Iterator[str]:
    """`umi mcp --http 127.0.0.1:0` in a subprocess; yields the URL it announced on stderr."""
    proc = subprocess.Popen(umi_mcp("--http", "127.0.0.1:0", *args), env=server_env(), cwd=SERVER_CWD,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=120)
            except queue.Empty:
                raise AssertionError(f"umi mcp --http announced no URL; stderr: {''.join(log)}") from None
            if line.startswith("umi mcp: serving "):
                url = line.removeprefix("umi mcp: serving ").strip()
                break
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp"), url
        yield url
        assert proc.poll() is None, f"the server died: {''.join(log)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content[0].text
    data = result.structured_content
    if data is None:  # clients that only read text get the same JSON
        data = json.loads(result.content[0].text)
    return data


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    return payload(await client.call_tool(tool, arguments))


async def refused(client: Client, tool: str, arguments: dict[str, Any], *needles: str) -> str:
    result = await client.call_tool(tool, arguments)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert result.is_error, f"{tool}({arguments}) was accepted: {text}"
    for needle in needles:
        assert needle in text, f"{tool}({arguments}): {needle!r} not in {text!r}"
    # ... and the server is still there, answering the next call correctly.
    assert (await call(client, "core_read"))["max_bytes"] == 32 * 1024
    return text


async def user_story(client: Client) -> None:
    listed = await client.list_tools()
    assert {t.name for t in listed.tools} == TOOLS
    recall_schema = next(t for t in listed.tools if t.name == "recall").input_schema
    assert {"query", "limit", "entity_types", "time_start", "time_end", "include_superseded",
            "user_id", "agent_id"} <= set(recall_schema["properties"])
    assert recall_schema["required"] == ["query"]

    # remember -> recall: the fact comes back, best first
    stored = await call(client, "remember", text="Alice is a software engineer at Acme Corp.")
    assert stored["duplicate"] is False and stored["entities"]
    ids = {e["id"] for e in stored["entities"]}
    await call(client, "remember", text="Bob lives in Berlin and loves climbing.")
    found = await call(client, "recall", query="Where does Alice work?", limit=3)
    assert found["facts"] and found["facts"][0]["content"] == "Alice is a software engineer at Acme Corp."
    assert all("embedding" not in f for f in found["facts"])
    assert len((await call(client, "recall", query="Alice Bob", limit=1))["facts"]) == 1
    people = await call(client, "recall", query="Alice", entity_types=["organization"])
    assert people["facts"] and {f["entity_type"] for f in people["facts"]} == {"organization"}
    # the Sim clock starts in November 2023: nothing was stored in 2020
    assert (await call(client, "recall", query="Alice", time_end="2020-01-01"))["facts"] == []
    assert (await call(client, "recall", query="Alice", time_start="2020-01-01T00:00:00Z"))["facts"]

    # get / history of one fact
    alice = found["facts"][0]
    assert (await call(client, "get", entity_id=alice["id"]))["fact"]["content"] == alice["content"]
    hist = (await call(client, "history", entity_id=alice["id"]))["history"]
    assert [h["op"] for h in hist][:1] == ["create"] and hist[0]["snapshot"]["id"] == alice["id"]

    # core memory: set a block, read it back as a tool result and as resources
    core = await call(client, "core_set_block", name="human", content="Prefers <concise> answers.",
                      importance=0.9)
    assert core["blocks"] == ["human"] and core["used_bytes"] == len("Prefers <concise> answers.")
    assert "Prefers &lt;concise&gt; answers." in (await call(client, "core_read"))["rendered"]
    assert "## human" in (await call(client, "core_read", format="markdown"))["rendered"]
    resource = await client.read_resource("umi://core")
    xml = resource.contents[0].text
    assert xml.startswith("<core_memory>") and "Prefers &lt;concise&gt; answers." in xml
    block = await client.read_resource("umi://core/human")
    assert block.contents[0].text == "Prefers <concise> answers."
    uris = {str(r.uri) for r in (await client.list_resources()).resources}
    assert uris == {"umi://core", "umi://core/human"}

    # forget: the statement (every fact it made) is gone everywhere a client can look
    assert alice["id"] in ids and len(ids) == 2  # "Alice" and "Acme Corp": one statement
    assert sorted(alice["mentions"]) == ["Acme Corp", "Alice"]
    assert (await call(client, "forget", entity_id=alice["id"]))["forgotten"] is True
    for entity_id in ids:
        assert (await call(client, "get", entity_id=entity_id))["fact"] is None
        assert (await call(client, "history", entity_id=entity_id))["history"][-1]["op"] == "delete"
    after = await call(client, "recall", query="Where does Alice work?", limit=5)
    assert all("Alice" not in f["content"] for f in after["facts"])
    assert (await call(client, "forget", entity_id=alice["id"]))["forgotten"] is False

    # malformed calls: each a tool error saying what was wrong; the server keeps serving
    await refused(client, "recall", {"query": "   "}, "EmptyQueryError")
    await refused(client, "recall", {"query": "x", "limit": "many"}, "limit", "valid integer")
    await refused(client, "recall", {"query": "x", "limit": 0}, "InvalidLimitError")
    await refused(client, "recall", {"query": "x", "entity_types": ["dragon"]}, "InvalidEntityTypeError")
    await refused(client, "recall", {"query": "x", "time_start": "last tuesday"},
                  "InvalidFilterError", "ISO-8601")
    await refused(client, "recall", {"query": "x", "time_start": "2026-02-01", "time_end": "2026-01-01"},
                  "InvalidFilterError", "after")
    await refused(client, "remember", {}, "text", "required")
    await refused(client, "remember", {"text": ""}, "EmptyTextError")
    await refused(client, "remember", {"text": "x", "importance": 7}, "InvalidImportanceError")
    await refused(client, "remember", {"text": "x", "metadata": {"k": [1, 2]}}, "metadata")
    await refused(client, "core_set_block", {"name": "bad name!", "content": "x"}, "InvalidLabelError")
    text = await refused(client, "core_set_block", {"name": "facts", "content": "x" * 40_000},
                         "CoreMemoryFullError")
    assert "32768" in text  # the message names the limit
    await refused(client, "no_such_tool", {}, "no_such_tool")
    with pytest.raises(MCPError, match="no core-memory block"):  # a protocol error, by the spec
        await client.read_resource("umi://core/nope")
    # the core memory is as it was before the refused writes
    assert (await call(client, "core_read"))["blocks"] == ["human"]
    assert (await call(client, "core_remove_block", name="human"))["removed"] is True
    assert (await call(client, "core_read"))["blocks"] == []


async def test_stdio_user_story() -> None:
    async with stdio_client() as client:
        await user_story(client)


async def test_streamable_http_user_story() -> None:
    with http_server() as url:
        async with Client(url, read_timeout_seconds=120) as client:
            await user_story(client)


async def test_http_address_defaults_to_loopback() -> None:
    from umi.integrations.mcp_server import parse_http_address

    assert parse_http_address("8765") == ("127.0.0.1", 8765)
    assert parse_http_address("localhost:0") == ("localhost", 0)
    assert parse_http_address("[::1]:9000") == ("::1", 9000)
    with pytest.raises(umi.ValidationError, match=r"\[HOST:\]PORT"):
        parse_http_address("127.0.0.1:http")
    with pytest.raises(umi.ValidationError, match="0..65535"):
        parse_http_address("70000")


async def test_a_bound_server_keeps_calls_in_its_scope() -> None:
    async with stdio_client("--user", "alice") as client:
        mine = await call(client, "remember", text="Alice keeps bees on the roof.")
        assert mine["entities"]
        hit = (await call(client, "recall", query="bees"))["facts"][0]
        assert hit.get("scope", {}).get("user_id") == "alice"
        # naming its own user is fine; naming another is refused
        assert (await call(client, "recall", query="bees", user_id="alice"))["facts"]
        await refused(client, "recall", {"query": "bees", "user_id": "bob"},
                      "bound to user_id 'alice'")
        await refused(client, "remember", {"text": "Bob hates bees.", "user_id": "bob"},
                      "bound to user_id 'alice'")
        # an agent may be chosen per call: the server left it unset
        await call(client, "core_set_block", name="persona", content="beekeeper", agent_id="helper")
        assert (await call(client, "core_read", agent_id="helper"))["blocks"] == ["persona"]
        assert (await call(client, "core_read"))["blocks"] == []


async def test_an_unbound_server_takes_the_scope_per_call() -> None:
    async with stdio_client() as client:
        await call(client, "remember", text="Alice keeps bees on the roof.", user_id="alice")
        await call(client, "remember", text="Bob keeps bees in the garden.", user_id="bob")
        alice = (await call(client, "recall", query="Who keeps bees?", user_id="alice"))["facts"]
        assert alice and all("Alice" in f["content"] for f in alice)
        bob = (await call(client, "recall", query="Who keeps bees?", user_id="bob"))["facts"]
        assert bob and all("Bob" in f["content"] for f in bob)
        # Alice's facts are not Bob's to get or forget
        assert (await call(client, "get", entity_id=alice[0]["id"], user_id="bob"))["fact"] is None
        assert (await call(client, "forget", entity_id=alice[0]["id"], user_id="bob"))["forgotten"] is False
        # no scope: the admin view sees both
        both = (await call(client, "recall", query="Who keeps bees?", limit=10))["facts"]
        assert {"alice", "bob"} <= {f.get("scope", {}).get("user_id") for f in both}
        await refused(client, "recall", {"query": "bees", "user_id": "not a valid id!"},
                      "InvalidScopeError")


async def test_http_serves_concurrent_clients() -> None:
    import asyncio

    with http_server("--user", "team") as url:
        async def client_work(n: int) -> None:
            async with Client(url, read_timeout_seconds=120) as client:
                for i in range(5):
                    await call(client, "core_set_block", name=f"c{n}_{i}", content=f"client {n} note {i}")
                await call(client, "remember", text=f"Client{n} deployed service{n} on Monday.")

        await asyncio.gather(*(client_work(n) for n in range(3)))
        async with Client(url, read_timeout_seconds=120) as client:
            core = await call(client, "core_read")
            assert sorted(core["blocks"]) == sorted(f"c{n}_{i}" for n in range(3) for i in range(5))
            assert core["used_bytes"] == sum(len(f"client {n} note {i}") for n in range(3) for i in range(5))
            for n in range(3):
                facts = (await call(client, "recall", query=f"What did Client{n} deploy?"))["facts"]
                assert any(f"service{n}" in f["content"] for f in facts)


async def test_a_duckdb_server_keeps_facts_and_core_blocks_across_restarts(tmp_path: Path) -> None:
    """The embedded default (a DuckDB file, the local embedder): what one server run was told,
    the next run recalls, and the core block set in the first is back in the second."""
    db = str(tmp_path / "memory.duckdb")
    async with stdio_client("--db", db, "--user", "alice") as client:
        stored = await call(client, "remember", text="Alice's sister Maya lives in Porto.")
        assert stored["entities"]
        await call(client, "core_set_block", name="human", content="Alice. Prefers short answers.")
    async with stdio_client("--db", db, "--user", "alice") as client:
        facts = (await call(client, "recall", query="Where does Maya live?", limit=3))["facts"]
        assert facts and "Porto" in facts[0]["content"]
        assert facts[0]["scope"]["user_id"] == "alice"
        core = await call(client, "core_read")
        assert core["blocks"] == ["human"] and "Prefers short answers." in core["rendered"]
        assert (await client.read_resource("umi://core/human")).contents[0].text == "Alice. Prefers short answers."
    async with stdio_client("--db", db, "--user", "bob") as client:  # another user: nothing of Alice's
        assert all("Porto" not in f["content"]
                   for f in (await call(client, "recall", query="Where does Maya live?"))["facts"])
        assert (await call(client, "core_read"))["blocks"] == []
