"""OpenAIProvider driven through the real ``openai`` SDK against a loopback chat-completions API."""

from __future__ import annotations

import json
import sys

import openai as openai_sdk
import pytest
from loopback_api import OPENAI_CHAT, Reply, openai_chat, openai_error
from provider_harness import API_KEY, record_sleeps, run_llm

import umi
from umi.pipeline import schemas
from umi.providers.openai import DEFAULT_OPENAI_MODEL, strict_schema

TASK = "extract_entities"
SYSTEM = schemas.EXTRACTION_SYSTEM
PROMPT = schemas.extraction_prompt("Bob moved from Paris to Berlin in 2024.")
SCHEMA = schemas.EXTRACTION_SCHEMA
GOOD = {
    "entities": [
        {"name": "Bob", "entity_type": "person", "content": "Bob moved from Paris to Berlin in 2024.",
         "confidence": 0.9},
        {"name": "Berlin", "entity_type": "location", "content": "Bob has lived in Berlin since 2024."},
    ]
}


@pytest.fixture
def make(api, closing):
    def make(**kw):
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("base_url", api.openai_url)
        kw.setdefault("timeout", 5.0)
        return closing(umi.OpenAIProvider(**kw))

    return make


def extract(provider, mode):
    return run_llm(provider, mode, SYSTEM, PROMPT, SCHEMA, TASK)


def strict_answer(data):
    """What a strict-mode model sends: every optional property present, null when unknown."""
    out = json.loads(json.dumps(data))
    for e in out["entities"]:
        e.setdefault("confidence", None)
    return json.dumps(out)


def test_good_extraction_sends_a_strict_json_schema_and_returns_data_and_usage(api, make, mode):
    api.script(OPENAI_CHAT, Reply(200, openai_chat(strict_answer(GOOD), prompt_tokens=1500,
                                                   completion_tokens=80, cached_tokens=1280)))
    result = extract(make(max_tokens=900), mode)

    assert result.data == GOOD  # the null confidence the strict schema forced is dropped again
    assert result.usage == umi.Usage(input_tokens=220, output_tokens=80, cache_read_input_tokens=1280,
                                     cache_creation_input_tokens=0, calls=1)
    (req,) = api.requests_to(OPENAI_CHAT)
    assert req.error is None  # the loopback server applies the API's strict-schema rules
    assert req.headers["authorization"] == f"Bearer {API_KEY}"
    assert (req.headers["x-stainless-async"] != "false") == (mode == "async")
    body = req.body
    assert body["model"] == DEFAULT_OPENAI_MODEL
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    assert body["max_completion_tokens"] == 900 and "max_tokens" not in body
    rf = body["response_format"]
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == TASK and rf["json_schema"]["strict"] is True
    sent = rf["json_schema"]["schema"]
    assert sent == strict_schema(SCHEMA)
    item = sent["properties"]["entities"]["items"]
    assert item["required"] == ["name", "entity_type", "content", "confidence"]
    assert item["properties"]["confidence"]["type"] == ["number", "null"]
    assert "minLength" not in item["properties"]["name"]
    assert sent["properties"]["entities"]["maxItems"] == 32  # kept: strict mode supports it


@pytest.mark.parametrize("task", sorted(schemas.SCHEMAS))
def test_every_task_schema_passes_the_strict_mode_rules(api, make, task):
    answers = {
        "extract_entities": {"entities": []},
        "rewrite_query": {"queries": ["Bob city", "where does Bob live"]},
        "classify_evolution": {"relations": [{"candidate_id": "e1", "evolution_type": "none",
                                              "reason": "unrelated", "confidence": 0.7}]},
    }
    api.script(OPENAI_CHAT, Reply(200, openai_chat(json.dumps(answers[task]))))
    assert make().complete_json(schemas.SYSTEMS[task], "input", schemas.SCHEMAS[task], task=task).data == answers[task]
    assert api.requests_to(OPENAI_CHAT)[0].error is None


def test_non_strict_mode_sends_the_schema_as_is_and_reads_prose_wrapped_json(api, make, mode):
    api.script(OPENAI_CHAT, Reply(200, openai_chat("Here you go:\n```json\n" + json.dumps(GOOD) + "\n```")))
    assert extract(make(strict=False), mode).data == GOOD
    rf = api.requests_to(OPENAI_CHAT)[0].body["response_format"]
    assert rf["json_schema"] == {"name": TASK, "schema": SCHEMA, "strict": False}


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (openai_chat(json.dumps({"entities": [{"name": "Bob", "entity_type": "alien", "content": "x",
                                               "confidence": None}]})), r"\$\.entities\[0\]\.entity_type"),
        (openai_chat(None, refusal="I'm sorry, I can't help with that."), "refused the extract_entities task"),
        (openai_chat('{"entities": [{"name": "Bob", "entity_', finish_reason="length"),
         "cut off at max_tokens=4096"),
        (openai_chat(""), "answer is empty"),
        (openai_chat(None, finish_reason="content_filter"), "content filter"),
        (openai_chat("no json here"), "holds no JSON object"),
    ],
    ids=["off-schema", "refusal", "truncated", "empty", "filtered", "no-json"],
)
def test_unusable_answers_are_invalid_responses(api, make, mode, reply, match):
    api.script(OPENAI_CHAT, Reply(200, reply, {"x-request-id": "req_oai_7"}))
    p = make()
    rec = record_sleeps(p)
    with pytest.raises(umi.InvalidResponseError, match=match) as info:
        extract(p, mode)
    assert (info.value.request_id, info.value.provider) == ("req_oai_7", "openai")
    assert len(api.requests_to(OPENAI_CHAT)) == 1 and rec.waits == []


def test_a_body_that_is_not_json_is_an_invalid_response(api, make, mode):
    api.script(OPENAI_CHAT, Reply(200, "<html>502 Bad Gateway</html>"))
    with pytest.raises(umi.InvalidResponseError, match="not JSON"):
        extract(make(), mode)


def test_429_with_retry_after_then_success(api, make, mode):
    api.script(
        OPENAI_CHAT,
        Reply(429, openai_error("requests", "Rate limit reached for gpt-4.1-mini", code="rate_limit_exceeded"),
              {"retry-after": "0.1"}),
        Reply(200, openai_chat(strict_answer(GOOD))),
    )
    p = make(max_retries=2)
    rec = record_sleeps(p)
    assert extract(p, mode).data == GOOD
    assert rec.waits == [0.1] and len(api.requests_to(OPENAI_CHAT)) == 2


def test_429_storm_past_max_retries_is_a_rate_limit_error(api, make, mode):
    api.script(OPENAI_CHAT, *[Reply(429, openai_error("requests", "Rate limit reached"),
                                    {"x-request-id": f"req_rl_{i}"}) for i in range(3)])
    p = make(max_retries=2)
    rec = record_sleeps(p)
    with pytest.raises(umi.RateLimitError) as info:
        extract(p, mode)
    assert (info.value.status, info.value.request_id, info.value.provider) == (429, "req_rl_2", "openai")
    assert isinstance(info.value.__cause__, openai_sdk.RateLimitError)
    assert len(rec.waits) == 2


def test_500_then_success(api, make, mode):
    api.script(OPENAI_CHAT, Reply(500, openai_error("server_error", "The server had an error")),
               Reply(200, openai_chat(strict_answer(GOOD))))
    p = make(max_retries=1)
    record_sleeps(p)
    assert extract(p, mode).data == GOOD


def test_a_server_that_hangs_past_the_timeout_is_a_provider_timeout(api, make, mode):
    api.script(OPENAI_CHAT, Reply(200, openai_chat(strict_answer(GOOD)), delay_secs=10))
    p = make(timeout=0.3, max_retries=0)
    with pytest.raises(umi.ProviderTimeoutError, match="0.3 s timeout, after 1 attempt") as info:
        extract(p, mode)
    assert isinstance(info.value.__cause__, openai_sdk.APITimeoutError)


def test_a_wrong_key_is_a_401_about_the_key(api, make, mode):
    p = make(api_key="sk-wrong", max_retries=2)
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderError, match="rejected the API key.*OPENAI_API_KEY") as info:
        extract(p, mode)
    assert type(info.value) is umi.ProviderError and info.value.status == 401
    assert rec.waits == [] and len(api.requests_to(OPENAI_CHAT)) == 1


def test_missing_key_and_missing_sdk(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(umi.ProviderError, match="set the OPENAI_API_KEY environment variable"):
        umi.OpenAIProvider()
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(umi.ProviderNotInstalledError) as info:
        umi.OpenAIProvider(api_key=API_KEY)
    assert info.value.extra == "openai" and 'pip install "umi[openai]"' in str(info.value)


def test_key_and_base_url_from_the_environment(api, monkeypatch, closing):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", api.openai_url)
    api.script(OPENAI_CHAT, Reply(200, openai_chat(strict_answer(GOOD))))
    p = closing(umi.OpenAIProvider(timeout=5))
    assert p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK).data == GOOD


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"strict": "yes"}, TypeError),
        ({"max_tokens": 0}, umi.InvalidConfigError),
        ({"timeout": -1}, umi.InvalidConfigError),
        ({"max_retries": 99}, umi.InvalidConfigError),
        ({"model": "  "}, umi.InvalidConfigError),
    ],
)
def test_bad_constructor_arguments(kwargs, exc):
    with pytest.raises(exc):
        umi.OpenAIProvider(api_key=API_KEY, **kwargs)


def test_bad_call_arguments_send_nothing(api, make, mode):
    with pytest.raises(umi.ValidationError, match="prompt must not be empty"):
        run_llm(make(), mode, SYSTEM, "", SCHEMA, TASK)
    assert api.requests == []
