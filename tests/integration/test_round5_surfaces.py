"""Round 5 adversary: umi's outer surfaces (SDK providers over loopback, the MCP server through the
SDK's own client, the LangGraph store) fed what a hostile or broken peer sends.

Each test here failed before its fix; what it pins down is said in its docstring.
"""

from __future__ import annotations

import pytest
from loopback_api import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_EMBEDDINGS,
    Reply,
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
