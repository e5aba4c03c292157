"""Round 5 adversary: umi's outer surfaces (SDK providers over loopback, the MCP server through the
SDK's own client, the LangGraph store) fed what a hostile or broken peer sends.

Each test here failed before its fix; what it pins down is said in its docstring.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from loopback_api import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    Reply,
    anthropic_tool_message,
    embeddings_responder,
    openai_chat,
)
from provider_harness import API_KEY, record_sleeps, run_embed, run_llm

import umi
from umi.pipeline import schemas

TASK = "extract_entities"
ARGS = (schemas.EXTRACTION_SYSTEM, schemas.extraction_prompt("Alice is here."), schemas.EXTRACTION_SCHEMA, TASK)


def _provider(kind, api, closing, **kw):
    kw.setdefault("api_key", API_KEY)
    kw.setdefault("timeout", 5.0)
    if kind == "anthropic":
        return closing(umi.AnthropicProvider(base_url=api.anthropic_url, **kw))
    if kind == "openai":
        return closing(umi.OpenAIProvider(base_url=api.openai_url, **kw))
    return closing(umi.OpenAIEmbeddingProvider(base_url=api.openai_url, dimensions=8,
                                               model="text-embedding-3-small", **kw))


PATHS = {"anthropic": ANTHROPIC_MESSAGES, "openai": OPENAI_CHAT, "embeddings": OPENAI_EMBEDDINGS}


def _run(kind, provider, mode):
    if kind == "embeddings":
        return run_embed(provider, mode, ["hello"])
    return run_llm(provider, mode, *ARGS)


# --- providers: a 2xx body the SDK cannot decode ----------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PATHS))
@pytest.mark.parametrize("body, match", [
    (b'{"id": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_a_2xx_body_that_cannot_be_decoded_is_an_invalid_response_not_retried(api, closing, mode, kind, body, match):
    """Bytes that are not UTF-8, or JSON nested past Python's recursion limit, in a 200 answer were a bare
    UnicodeDecodeError / RecursionError out of the SDK (JSONDecodeError alone was mapped)."""
    api.script(PATHS[kind], Reply(200, body))
    p = _provider(kind, api, closing, max_retries=2)
    rec = record_sleeps(p)
    with pytest.raises(umi.InvalidResponseError, match=match):
        _run(kind, p, mode)
    assert len(api.requests_to(PATHS[kind])) == 1 and rec.waits == []



@pytest.mark.parametrize("kind", sorted(PATHS))
@pytest.mark.parametrize("body, shown", [('"<html>Bad Gateway</html>"', "str '<html>Bad Gateway</html>'"),
                                         ([1, 2, 3], "list [1, 2, 3]"), ("null", "NoneType None")])
def test_a_2xx_json_body_that_is_no_object_is_named_as_it_is(api, closing, mode, kind, body, shown):
    """The SDKs hand back a JSON string, array or null as it is; umi then said "no extract_entities tool
    call and no text in the answer (got nothing...)", "the response has no choices" or "asked for 1
    vectors, got NoneType": the answer was not an API object at all, and the message now says so."""
    api.script(PATHS[kind], Reply(200, body))
    p = _provider(kind, api, closing, max_retries=2)
    rec = record_sleeps(p)
    error = umi.EmbeddingError if kind == "embeddings" else umi.InvalidResponseError
    with pytest.raises(error, match=f"not an API object: got {re.escape(shown)}"):
        _run(kind, p, mode)
    assert len(api.requests_to(PATHS[kind])) == 1 and rec.waits == []

# --- providers: an answer that trickles in ----------------------------------------------------------
GOOD = {"entities": [{"name": "Alice", "entity_type": "person", "content": "Alice is here.", "confidence": None}]}


def _good_reply(kind):
    if kind == "anthropic":
        return lambda rec: Reply(200, anthropic_tool_message(TASK, {"entities": [dict(GOOD["entities"][0], confidence=0.9)]}))
    if kind == "openai":
        return lambda rec: Reply(200, openai_chat(json.dumps(GOOD)))
    return embeddings_responder(8)


@pytest.mark.parametrize("kind", sorted(PATHS))
def test_an_answer_that_trickles_in_past_the_timeout_is_a_provider_timeout(api, closing, mode, kind):
    """The SDKs' timeout bounds each read: a body sent 16 bytes every 0.1 s (a few seconds in all)
    was read to the end and the call succeeded, however long it took (a 500-byte answer at 0.2 s a
    byte: 100 s with timeout=1). The timeout now bounds the whole answer."""
    good = _good_reply(kind)
    api.script(PATHS[kind], lambda rec: dataclasses.replace(good(rec), trickle_secs=0.1))
    p = _provider(kind, api, closing, timeout=0.5, max_retries=0)
    with pytest.raises(umi.ProviderTimeoutError, match="0.5 s timeout, after 1 attempt"):
        _run(kind, p, mode)
    assert len(api.requests_to(PATHS[kind])) == 1
    # the same answer sent at once is fine (the deadline is per request, not per client)
    api.script(PATHS[kind], good)
    assert _run(kind, p, mode) is not None



@pytest.mark.parametrize("kind", sorted(PATHS))
def test_an_answer_past_the_body_limit_is_an_invalid_response_not_retried(api, closing, mode, kind, monkeypatch):
    """The SDKs read a whole body into memory, however large (a 200 MB answer was read and parsed;
    an endless one grew until the timeout). A body past MAX_RESPONSE_BYTES (here lowered to 2000)
    is read no further: an InvalidResponseError naming the limit, not retried."""
    from umi.providers import _deadline

    monkeypatch.setattr(_deadline, "MAX_RESPONSE_BYTES", 2000)
    good = _good_reply(kind)

    def padded(rec):
        r = good(rec)
        return dataclasses.replace(r, body=json.dumps(r.body).encode() + b" " * 5000)  # valid JSON, 5 kB

    api.script(PATHS[kind], padded)
    p = _provider(kind, api, closing, max_retries=2)
    rec = record_sleeps(p)
    with pytest.raises(umi.InvalidResponseError, match="larger than 2000 bytes"):
        _run(kind, p, mode)
    assert len(api.requests_to(PATHS[kind])) == 1 and rec.waits == []
    api.script(PATHS[kind], good)  # an answer within the limit is read as before
    assert _run(kind, p, mode) is not None

# --- the MCP server: a JSON boolean is no number, a string no int or bool ---------------------------
@pytest.mark.parametrize("tool, args", [
    ("recall", {"query": "Who keeps bees?", "limit": True}),
    ("recall", {"query": "Who keeps bees?", "limit": "2"}),
    ("recall", {"query": "Who keeps bees?", "limit": 2.0}),
    ("recall", {"query": "Who keeps bees?", "include_superseded": "yes"}),
    ("remember", {"text": "Wes keeps bees in Turku.", "importance": True}),
    ("remember", {"text": "Wes keeps bees in Turku.", "importance": "0.5"}),
    ("remember", {"text": "Wes keeps bees in Turku.", "extract": "no"}),
    ("core_set_block", {"name": "human", "content": "Likes bees.", "importance": True}),
])
async def test_mcp_arguments_are_as_strict_as_the_python_api(tool, args):
    """The SDK validates tool arguments in pydantic's lax mode: {"limit": true} recalled one fact,
    {"importance": true} stored importance 1.0, {"extract": "no"} skipped extraction, where umi's
    own API refuses a bool for a number and a str for an int or a bool (TypeError)."""
    pytest.importorskip("mcp", reason="the mcp extra is not installed")
    from mcp import Client

    from umi.integrations.mcp_server import build_server

    with umi.Memory.sim(seed=1) as m:
        async with Client(build_server(m)) as client:
            result = await client.call_tool(tool, args)
            text = " ".join(getattr(c, "text", "") for c in result.content)
            assert result.is_error, f"{tool}({args}) was accepted: {text[:200]}"
            assert m.count_sync() == 0 and m.core.labels() == []
            # a JSON int is still a number
            if "importance" in args:
                ok = await client.call_tool(tool, {**args, "importance": 1})
                assert not ok.is_error


async def test_mcp_scoped_views_are_bounded_and_each_user_still_sees_only_their_facts(monkeypatch):
    """A client naming many user ids kept one view per id for the server's life; now at most
    VIEWS_MAX, the least recently used made again when asked (views are cheap: the same store)."""
    pytest.importorskip("mcp", reason="the mcp extra is not installed")
    from mcp import Client

    from umi.integrations import mcp_server

    monkeypatch.setattr(mcp_server, "VIEWS_MAX", 3)
    with umi.Memory.sim(seed=1) as m:
        server = mcp_server.build_server(m)
        async with Client(server) as client:
            for i in range(8):
                ok = await client.call_tool("remember", {"text": f"user{i} keeps {i} bees.", "extract": False,
                                                         "user_id": f"u{i}"})
                assert not ok.is_error
            assert len(server._umi_views._views) <= 3
            for i in (0, 7, 3):  # evicted ones come back scoped as before
                got = await client.call_tool("recall", {"query": "bees", "user_id": f"u{i}"})
                texts = [f["content"] for f in got.structured_content["facts"]]
                assert texts == [f"user{i} keeps {i} bees."]
            assert len(server._umi_views._views) <= 3


# --- the LangGraph store ------------------------------------------------------------------------------
@pytest.fixture
def lg_store():
    pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
    from umi.integrations.langgraph import UmiStore

    with umi.Memory.sim(seed=5) as m:
        store = UmiStore(m)
        store.put(("notes",), "a", {"text": "Alice keeps bees in Turku.", "n": 3})
        store.put(("notes",), "b", {"text": "Bob grows tomatoes.", "n": "many"})
        store.put(("notes",), "c", {"text": "Carol sails.", "n": 10 ** 400})
        store.put(("notes",), "d", {"text": "Dan has no count."})
        yield store


def test_a_blank_langgraph_query_lists_like_no_query(lg_store):
    """BaseStore.search takes any str as a query (InMemoryStore answers a blank one); umi passed
    "   " to recall, which refused it (EmptyQueryError), so an agent's blank search failed."""
    listed = lg_store.search(("notes",), limit=10)
    assert [i.key for i in lg_store.search(("notes",), query="   ", limit=10)] == [i.key for i in listed]
    assert len(listed) == 4


def test_langgraph_comparison_filters_are_checked_up_front_and_skip_non_numbers(lg_store):
    """{"n": {"$gt": 1}} over an item whose n is "many" (or an int past float's range) raised a bare
    ValueError (OverflowError) from float(); an operand that is no number, or an unknown operator,
    was refused only when an item with the field was met (an empty namespace answered [])."""
    assert [i.key for i in lg_store.search(("notes",), filter={"n": {"$gt": 1}}, limit=10)] == ["a"]
    assert [i.key for i in lg_store.search(("notes",), filter={"n": {"$lte": 3}}, limit=10)] == ["a"]
    for bad, match in [({"n": {"$gt": "x"}}, r"\$gt compares numbers"), ({"n": {"$gt": None}}, "numbers"),
                       ({"n": {"$regex": "m.*"}}, "unsupported"), ({"n": [{"$foo": 1}]}, "unsupported")]:
        for where in (("notes",), ("empty",)):
            with pytest.raises(umi.InvalidFilterError, match=match):
                lg_store.search(where, filter=bad)
            with pytest.raises(umi.InvalidFilterError, match=match):
                lg_store.search(where, query="bees", filter=bad)




def test_a_langgraph_listing_takes_any_limit_like_the_reference(lg_store):
    """BaseStore.search takes any limit >= 0 (InMemoryStore: search(ns, limit=10**6) lists
    everything); without a query umi handed the limit to the storage listing, whose limit is
    100000: InvalidLimitError for a listing that asks for 'all'. The listing now pages."""
    listed = [i.key for i in lg_store.search(("notes",), limit=4)]
    assert [i.key for i in lg_store.search(("notes",), limit=10**6)] == listed
    assert [i.key for i in lg_store.search(("notes",), limit=10**6, offset=1)] == listed[1:]
    assert [i.key for i in lg_store.search(("notes",), filter={"n": 3}, limit=10**6)] == ["a"]

# --- export to a file: a failure leaves what was there ------------------------------------------------
def test_a_failed_export_leaves_the_previous_file_whole_and_no_new_file(tmp_path, monkeypatch):
    """`umi export --out backup.jsonl` opened the file with "w": a failure half-way (a full disk)
    left last night's good backup truncated to what had been written. An existing file is now
    replaced only once the new export is written whole; a new file is removed again."""
    import errno

    from umi.pipeline import transfer

    backup, fresh = tmp_path / "backup.jsonl", tmp_path / "fresh.jsonl"
    with umi.Memory.sim(seed=1) as m:
        m.remember_sync("Ana sails in Lisbon.")
        m.remember_sync("Bob keeps bees in Turku.")
        m.export_sync(str(backup))
        backup.chmod(0o640)
        good = backup.read_bytes()
        dumps = transfer.dumps

        def full_disk_after_two(record, calls=[0]):
            calls[0] += 1
            if calls[0] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return dumps(record)

        monkeypatch.setattr(transfer, "dumps", full_disk_after_two)
        for out in (backup, fresh):
            with pytest.raises(umi.TransferFileError, match="cannot write the export"):
                m.export_sync(str(out))
        assert backup.read_bytes() == good and (backup.stat().st_mode & 0o777) == 0o640
        assert sorted(p.name for p in tmp_path.iterdir() if "jsonl" in p.name) == ["backup.jsonl"]
        monkeypatch.setattr(transfer, "dumps", dumps)
        m.remember_sync("Carol rows on the Douro.")
        m.export_sync(str(backup))  # a good export replaces it, keeping its mode
        assert backup.read_bytes() != good and (backup.stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_the_environment_proxy_is_still_used(api, closing, mode, kind, monkeypatch):
    """The deadline must not cost the SDK's own client setup: a replacement transport dropped the
    proxies the SDK takes from the environment. Here the loopback API plays the proxy for an API
    at 127.0.0.2:1, where nothing listens: the answer comes only through the proxy."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{api.port}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    base = "http://127.0.0.2:1"
    path = PATHS[kind]
    api.script(path, _good_reply(kind)(None))
    url = base if kind == "anthropic" else base + "/v1"
    p = closing((umi.AnthropicProvider if kind == "anthropic" else umi.OpenAIProvider)(
        api_key=API_KEY, base_url=url, timeout=5.0, max_retries=0))
    assert _run(kind, p, mode).data["entities"][0]["name"] == "Alice"
    assert [r.path for r in api.requests] == [path]


def test_an_import_error_names_a_file_opened_by_descriptor_as_input_and_a_bad_header_plainly(tmp_path):
    """`umi import -` reads stdin opened by its descriptor, whose name is the int 0: an error said
    "0:1: ..." (a line of a file named 0). A header whose version is no int said "'>' not supported
    between instances of 'str' and 'int'"."""
    import os

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "header", "version": "2"}\n', encoding="utf-8")
    with umi.Memory.sim(seed=1) as m:
        with open(os.open(bad, os.O_RDONLY), encoding="utf-8") as f:  # name: the descriptor, an int
            with pytest.raises(umi.ValidationError, match=r"^<input>:1: the header's version must be an integer"):
                m.import_sync(f)
        assert m.count_sync() == 0
