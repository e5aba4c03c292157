"""AnthropicProvider driven through the real ``anthropic`` SDK against a loopback Messages API."""

from __future__ import annotations

import asyncio
import json
import sys

import anthropic as anthropic_sdk
import pytest
from loopback_api import (
    ANTHROPIC_MESSAGES,
    Reply,
    anthropic_error,
    anthropic_message,
    anthropic_text_message,
    anthropic_tool_message,
    anthropic_usage,
    api_key_of,
)
from provider_harness import API_KEY, record_sleeps, run_llm

import umi
from umi.pipeline import schemas
from umi.providers.anthropic import DEFAULT_ANTHROPIC_MODEL

TASK = "extract_entities"
SYSTEM = schemas.EXTRACTION_SYSTEM
PROMPT = schemas.extraction_prompt("Alice is a software engineer at Acme Corp. She lives in Lisbon.")
SCHEMA = schemas.EXTRACTION_SCHEMA
GOOD = {
    "entities": [
        {"name": "Alice", "entity_type": "person", "content": "Alice is a software engineer at Acme Corp.",
         "confidence": 0.95},
        {"name": "Acme Corp", "entity_type": "organization", "content": "Acme Corp employs Alice."},
    ]
}


@pytest.fixture
def make(api, closing):
    def make(**kw):
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("base_url", api.anthropic_url)
        kw.setdefault("timeout", 5.0)
        return closing(umi.AnthropicProvider(**kw))

    return make


def extract(provider, mode):
    return run_llm(provider, mode, SYSTEM, PROMPT, SCHEMA, TASK)


# --- good answers ----------------------------------------------------------------------------------


def test_good_extraction_returns_data_usage_and_sends_a_cacheable_forced_tool_call(api, make, mode):
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(
        TASK, GOOD, usage=anthropic_usage(input_tokens=812, output_tokens=96, cache_read=1024, cache_creation=0))))
    p = make(max_tokens=2000)
    result = extract(p, mode)

    assert result.data == GOOD
    assert result.usage == umi.Usage(input_tokens=812, output_tokens=96, cache_read_input_tokens=1024,
                                     cache_creation_input_tokens=0, calls=1)
    (req,) = api.requests_to(ANTHROPIC_MESSAGES)
    assert req.error is None  # the loopback server found nothing the real API would refuse
    assert api_key_of(req) == API_KEY
    assert req.headers["anthropic-version"]
    # the async face runs on the async client, not the sync one in a thread
    assert (req.headers["x-stainless-async"] != "false") == (mode == "async")
    body = req.body
    assert body["model"] == DEFAULT_ANTHROPIC_MODEL
    assert body["max_tokens"] == 2000
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    assert body["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    (tool,) = body["tools"]
    assert tool["name"] == TASK
    assert tool["input_schema"] == SCHEMA
    assert tool["cache_control"] == {"type": "ephemeral"}
    assert body["tool_choice"] == {"type": "tool", "name": TASK}


@pytest.mark.parametrize("task", sorted(schemas.SCHEMAS))
def test_every_task_schema_is_a_tool_the_api_accepts(api, make, task):
    answers = {
        "extract_entities": {"entities": []},
        "rewrite_query": {"queries": ["Alice employer", "where Alice works"]},
        "classify_evolution": {"relations": [{"candidate_id": "e1", "evolution_type": "update",
                                              "reason": "new job", "confidence": 0.8}]},
    }
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(task, answers[task])))
    result = make().complete_json(schemas.SYSTEMS[task], "input", schemas.SCHEMAS[task], task=task)
    assert result.data == answers[task]
    (req,) = api.requests_to(ANTHROPIC_MESSAGES)
    assert req.error is None
    assert req.body["tools"][0]["input_schema"] == schemas.SCHEMAS[task]


def test_options_reach_the_request(api, make):
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, GOOD)))
    make(model="claude-sonnet-4-6", max_tokens=123).complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)
    body = api.requests_to(ANTHROPIC_MESSAGES)[0].body
    assert (body["model"], body["max_tokens"]) == ("claude-sonnet-4-6", 123)


def test_an_empty_system_prompt_is_left_out(api, make):
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, GOOD)))
    make().complete_json("  ", PROMPT, SCHEMA, task=TASK)
    (req,) = api.requests_to(ANTHROPIC_MESSAGES)
    assert req.error is None and "system" not in req.body


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is what I found:\n" + json.dumps(GOOD) + "\nLet me know if you need more.",
        "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
        "Result:\n```\n" + json.dumps(GOOD) + "\n```\nDone.",
        # an object that does not match comes first; the matching one is used
        'I considered {"entities": "none"} but the answer is ' + json.dumps(GOOD),
    ],
    ids=["prose", "json-fence", "bare-fence", "second-object"],
)
def test_json_answered_in_text_is_still_understood(api, make, mode, text):
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_text_message(text)))
    assert extract(make(), mode).data == GOOD


# --- answers that are not usable ---------------------------------------------------------------------


def test_tool_input_that_breaks_the_schema_is_an_invalid_response_and_not_retried(api, make, mode):
    bad = {"entities": [{"name": "Alice", "entity_type": "robot", "content": "Alice is a robot."}]}
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, bad), {"request-id": "req_bad_1"}))
    p = make()
    rec = record_sleeps(p)
    with pytest.raises(umi.InvalidResponseError) as info:
        extract(p, mode)
    err = info.value
    assert "$.entities[0].entity_type" in str(err) and "'robot'" in str(err)
    assert (err.provider, err.request_id, err.status) == ("anthropic", "req_bad_1", None)
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 1 and rec.waits == []


@pytest.mark.parametrize(
    ("tool_input", "where"),
    [
        ({"entities": [{"name": "A", "entity_type": "person", "content": "x", "age": 3}]}, "unexpected property 'age'"),
        ({"entities": [{"name": "A", "entity_type": "person"}]}, "missing required property 'content'"),
        ({"entities": [{"name": "A", "entity_type": "person", "content": "x", "confidence": 1.5}]}, "above the maximum"),
        ({"entities": [{"name": "", "entity_type": "person", "content": "x"}]}, "minLength"),
        ({"entities": "Alice"}, "expected array"),
        ({}, "missing required property 'entities'"),
        ({"entities": [{"name": "A", "entity_type": "person", "content": "x"}] * 33}, "more than maxItems 32"),
    ],
)
def test_schema_violations_name_what_is_wrong(api, make, tool_input, where):
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, tool_input)))
    with pytest.raises(umi.InvalidResponseError, match=where):
        make().complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (anthropic_text_message("I could not find any facts in that text."), "without a JSON object"),
        (anthropic_text_message('{"entities": [{"name": "A"}]}'), "does not match the extract_entities schema"),
        (anthropic_message([], stop_reason="end_turn"), "no extract_entities tool call and no text"),
        (anthropic_text_message("I can't help with that.", stop_reason="refusal"), "declined"),
        (anthropic_tool_message("some_other_tool", GOOD), "no extract_entities tool call"),
        (anthropic_text_message('{"entities": [{"name": "Alice", "entity_ty', stop_reason="max_tokens"),
         "cut off at max_tokens=4096"),
    ],
    ids=["no-json", "json-off-schema", "empty", "refusal", "wrong-tool", "truncated"],
)
def test_unusable_answers_are_invalid_responses(api, make, mode, message, match):
    api.script(ANTHROPIC_MESSAGES, Reply(200, message))
    with pytest.raises(umi.InvalidResponseError, match=match):
        extract(make(), mode)


def test_a_body_that_is_not_json_is_an_invalid_response(api, make, mode):
    api.script(ANTHROPIC_MESSAGES, Reply(200, '{"id": "msg_01", "content": [tr'))
    p = make()
    rec = record_sleeps(p)
    with pytest.raises(umi.InvalidResponseError, match="not JSON") as info:
        extract(p, mode)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 1 and rec.waits == []


# --- retries, rate limits, timeouts, errors -----------------------------------------------------------


def test_429_waits_what_retry_after_asks_then_succeeds(api, make, mode):
    api.script(
        ANTHROPIC_MESSAGES,
        Reply(429, anthropic_error("rate_limit_error", "Number of request tokens has exceeded your limit."),
              {"retry-after": "0.2"}),
        Reply(200, anthropic_tool_message(TASK, GOOD)),
    )
    p = make(max_retries=2)
    rec = record_sleeps(p)
    assert extract(p, mode).data == GOOD
    assert rec.waits == [0.2]
    reqs = api.requests_to(ANTHROPIC_MESSAGES)
    assert len(reqs) == 2 and reqs[0].body == reqs[1].body


def test_retry_after_ms_is_preferred_and_a_long_retry_after_is_capped(api, make):
    api.script(
        ANTHROPIC_MESSAGES,
        Reply(429, anthropic_error("rate_limit_error", "slow down"), {"retry-after-ms": "150", "retry-after": "1"}),
        Reply(429, anthropic_error("rate_limit_error", "slow down"), {"retry-after": "86400"}),
        Reply(200, anthropic_tool_message(TASK, GOOD)),
    )
    p = make(max_retries=3, max_retry_wait=2.5)
    rec = record_sleeps(p)
    assert p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK).data == GOOD
    assert rec.waits == [0.15, 2.5]


def test_retry_after_is_honoured_with_the_real_sleep(api, make, mode):
    # no recorder: the provider really sleeps the 50 ms the server asks for
    api.script(
        ANTHROPIC_MESSAGES,
        Reply(429, anthropic_error("rate_limit_error", "slow down"), {"retry-after": "0.05"}),
        Reply(200, anthropic_tool_message(TASK, GOOD)),
    )
    assert extract(make(max_retries=1), mode).data == GOOD
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 2


def test_529_storm_past_max_retries_is_a_rate_limit_error_with_status_and_request_id(api, make, mode):
    storm = [Reply(529, anthropic_error("overloaded_error", "Overloaded"), {"request-id": f"req_storm_{i}"})
             for i in range(4)]
    api.script(ANTHROPIC_MESSAGES, *storm)
    p = make(max_retries=3)
    rec = record_sleeps(p)
    with pytest.raises(umi.RateLimitError) as info:
        extract(p, mode)
    err = info.value
    assert (err.status, err.request_id, err.provider) == (529, "req_storm_3", "anthropic")
    assert "overloaded" in str(err) and "after 4 attempts" in str(err) and "req_storm_3" in str(err)
    assert isinstance(err.__cause__, anthropic_sdk.APIStatusError) and err.__cause__.status_code == 529
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 4
    # exponential backoff (0.5, 1, 2 s) with at most 25 % jitter taken off
    assert len(rec.waits) == 3
    for wait, base in zip(rec.waits, (0.5, 1.0, 2.0)):
        assert 0.75 * base <= wait <= base


def test_500_then_success(api, make, mode):
    api.script(
        ANTHROPIC_MESSAGES,
        Reply(500, anthropic_error("api_error", "Internal server error")),
        Reply(200, anthropic_tool_message(TASK, GOOD)),
    )
    p = make(max_retries=1)
    rec = record_sleeps(p)
    assert extract(p, mode).data == GOOD
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 2 and len(rec.waits) == 1


def test_5xx_past_max_retries_is_a_provider_error_with_status(api, make):
    api.script(ANTHROPIC_MESSAGES, *[Reply(503, anthropic_error("api_error", "unavailable")) for _ in range(3)])
    p = make(max_retries=2)
    record_sleeps(p)
    with pytest.raises(umi.ProviderError) as info:
        p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)
    assert type(info.value) is umi.ProviderError and info.value.status == 503
    assert "after 3 attempts" in str(info.value)


def test_max_retries_zero_means_one_attempt(api, make):
    api.script(ANTHROPIC_MESSAGES, Reply(429, anthropic_error("rate_limit_error", "slow down"), {"retry-after": "0"}))
    p = make(max_retries=0)
    rec = record_sleeps(p)
    with pytest.raises(umi.RateLimitError, match="after 1 attempt"):
        p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)
    assert rec.waits == [] and len(api.requests_to(ANTHROPIC_MESSAGES)) == 1


def test_x_should_retry_false_is_obeyed(api, make):
    api.script(ANTHROPIC_MESSAGES, Reply(500, anthropic_error("api_error", "do not retry"), {"x-should-retry": "false"}))
    p = make(max_retries=3)
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderError, match="after 1 attempt"):
        p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)
    assert rec.waits == []


def test_a_server_that_hangs_past_the_timeout_is_a_provider_timeout(api, make, mode):
    api.script(ANTHROPIC_MESSAGES, *[Reply(200, anthropic_tool_message(TASK, GOOD), delay_secs=10) for _ in range(2)])
    p = make(timeout=0.3, max_retries=1)
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderTimeoutError) as info:
        extract(p, mode)
    assert "0.3 s timeout" in str(info.value) and "after 2 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, anthropic_sdk.APITimeoutError)
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 2 and len(rec.waits) == 1


def test_a_wrong_key_is_a_401_provider_error_about_the_key_and_not_retried(api, make, mode):
    p = make(api_key="sk-wrong", max_retries=3)
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderError) as info:
        extract(p, mode)
    err = info.value
    assert type(err) is umi.ProviderError and err.status == 401 and err.request_id
    assert "rejected the API key" in str(err) and "ANTHROPIC_API_KEY" in str(err)
    assert "sk-wrong" not in str(err)
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 1 and rec.waits == []


def test_a_bad_request_is_not_retried(api, make):
    api.script(ANTHROPIC_MESSAGES, Reply(400, anthropic_error("invalid_request_error", "prompt is too long")))
    p = make()
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderError, match="400 invalid_request_error: prompt is too long"):
        p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK)
    assert rec.waits == []


def test_connection_refused_is_retried_then_a_provider_error(make, dead_port, mode):
    p = make(base_url=f"http://127.0.0.1:{dead_port}", max_retries=2)
    rec = record_sleeps(p)
    with pytest.raises(umi.ProviderError, match="connection failed.*after 3 attempts") as info:
        extract(p, mode)
    assert info.value.status is None and len(rec.waits) == 2


# --- construction and input checks ---------------------------------------------------------------


def test_missing_key_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(umi.ProviderError, match=r"ANTHROPIC_API_KEY.*export ANTHROPIC_API_KEY=") as info:
        umi.AnthropicProvider()
    assert info.value.provider == "anthropic"
    with pytest.raises(umi.ProviderError, match="api_key was empty"):
        umi.AnthropicProvider(api_key=" ")


def test_key_and_base_url_come_from_the_environment(api, monkeypatch, closing):
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", api.anthropic_url)
    api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, GOOD)))
    p = closing(umi.AnthropicProvider(timeout=5))
    assert p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK).data == GOOD
    assert api_key_of(api.requests_to(ANTHROPIC_MESSAGES)[0]) == API_KEY


def test_without_the_sdk_construction_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "anthropic", None)  # what `import anthropic` sees when it is not installed
    with pytest.raises(umi.ProviderNotInstalledError) as info:
        umi.AnthropicProvider(api_key=API_KEY)
    assert info.value.extra == "anthropic"
    assert 'pip install "umi[anthropic]"' in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"timeout": 0}, umi.InvalidConfigError, r"timeout must be in \(0, 3600\]"),
        ({"timeout": float("nan")}, umi.InvalidConfigError, "timeout"),
        ({"timeout": "60"}, TypeError, "timeout must be a number"),
        ({"max_retries": 11}, umi.InvalidConfigError, r"max_retries must be in \[0, 10\]"),
        ({"max_retries": -1}, umi.InvalidConfigError, "max_retries"),
        ({"max_retries": 2.0}, TypeError, "max_retries must be an int"),
        ({"max_tokens": 0}, umi.InvalidConfigError, r"max_tokens must be in \[1, 128000\]"),
        ({"model": ""}, umi.InvalidConfigError, "model must be a non-empty"),
        ({"model": None}, TypeError, "model must be a str"),
        ({"base_url": "localhost:8080"}, umi.InvalidConfigError, "http"),
        ({"api_key": 123}, TypeError, "api_key must be a str"),
        ({"max_retry_wait": -1}, umi.InvalidConfigError, "max_retry_wait"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs.setdefault("api_key", API_KEY)
    with pytest.raises(exc, match=match):
        umi.AnthropicProvider(**kwargs)


@pytest.mark.parametrize(
    ("args", "task", "exc", "match"),
    [
        ((SYSTEM, b"bytes", SCHEMA), TASK, TypeError, "prompt must be a str"),
        ((SYSTEM, "  ", SCHEMA), TASK, umi.ValidationError, "prompt must not be empty"),
        ((None, PROMPT, SCHEMA), TASK, TypeError, "system must be a str"),
        ((SYSTEM, PROMPT, SCHEMA), "extract entities!", umi.ValidationError, "task must match"),
        ((SYSTEM, PROMPT, [SCHEMA]), TASK, TypeError, "schema must be a dict"),
        ((SYSTEM, PROMPT, {"type": "array"}), TASK, umi.InvalidConfigError, "must be of type 'object'"),
        ((SYSTEM, PROMPT, {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}), TASK,
         umi.InvalidConfigError, r"uses \['pattern'\]"),
    ],
)
def test_bad_call_arguments_send_nothing(api, make, mode, args, task, exc, match):
    with pytest.raises(exc, match=match):
        run_llm(make(), mode, *args, task)
    assert api.requests == []


def test_repr_names_the_model_and_never_the_key(make):
    p = make(model="claude-haiku-4-5")
    assert "claude-haiku-4-5" in repr(p) and API_KEY not in repr(p)


def test_one_provider_serves_several_event_loops_and_threads_of_calls(api, make):
    api.set_default(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message(TASK, GOOD)))
    p = make()

    async def two_at_once():
        try:
            return await asyncio.gather(*(p.acomplete_json(SYSTEM, PROMPT, SCHEMA, task=TASK) for _ in range(2)))
        finally:
            await p.aclose()

    for _ in range(2):  # a second loop gets its own client: the first one's pool is bound to a closed loop
        assert [r.data for r in asyncio.run(two_at_once())] == [GOOD, GOOD]
    assert p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK).data == GOOD
    p.close()
    assert p.complete_json(SYSTEM, PROMPT, SCHEMA, task=TASK).data == GOOD  # usable again after close()
    assert len(api.requests_to(ANTHROPIC_MESSAGES)) == 6


def test_import_umi_does_not_import_the_sdk(tmp_path):
    import subprocess

    code = "import sys, umi; print('anthropic' in sys.modules, 'openai' in sys.modules)"
    # cwd outside the repository, so the installed umi is imported (not the uncompiled source tree)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.split() == ["False", "False"]
