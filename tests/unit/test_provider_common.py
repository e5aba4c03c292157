"""What the SDK-backed providers share: the schema validator, JSON recovery, retry timing and
error mapping, the per-loop clients and the settings checks (umi.providers._schema, _json_reply,
_retry, _sdk, _checks)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import string

import anthropic
import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import umi
from umi.pipeline import schemas
from umi.providers import _checks, _retry, _sdk
from umi.providers._json_reply import iter_json_objects, parse_json_reply
from umi.providers._retry import Failure, RetryPolicy, classify_failure, failure_to_error, parse_retry_after
from umi.providers._schema import SchemaViolation, check_schema, validate_json
from umi.providers.openai import _drop_optional_nulls, strict_schema

# --- validate_json ------------------------------------------------------------------------------------


def test_the_task_schemas_are_in_the_supported_subset():
    for schema in schemas.SCHEMAS.values():
        check_schema(schema)


@pytest.mark.parametrize(
    ("value", "schema", "where"),
    [
        (True, {"type": "number"}, "expected number, got boolean True"),
        (1, {"type": "boolean"}, "expected boolean"),
        (1.5, {"type": "integer"}, "expected integer"),
        (float("nan"), {"type": "number"}, "finite"),
        (float("inf"), {"type": ["number", "null"]}, "finite"),
        ("x", {"type": ["number", "null"]}, "expected number or null"),
        (1, {"enum": [True, "1"]}, "1 is not one of"),
        (-0.1, {"type": "number", "minimum": 0}, "below the minimum 0"),
        ("abcd", {"type": "string", "maxLength": 3}, "longer than maxLength 3"),
        ([], {"type": "array", "minItems": 1}, "fewer than minItems 1"),
        ({"a": 1, "b": 2}, {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
         "unexpected property 'b'"),
        ({"a": 1, "b": "x"}, {"type": "object", "additionalProperties": {"type": "integer"}}, r"\$\.b: expected integer"),
        ([1, "2"], {"type": "array", "items": {"type": "integer"}}, r"\$\[1\]: expected integer"),
    ],
)
def test_violations(value, schema, where):
    with pytest.raises(SchemaViolation, match=where):
        validate_json(value, schema)


@pytest.mark.parametrize(
    ("value", "schema"),
    [
        (2.0, {"type": "integer"}),
        (3, {"type": "number", "minimum": 3, "maximum": 3}),
        (None, {"type": ["string", "null"]}),
        ({"a": 1, "extra": [1]}, {"type": "object", "properties": {"a": {"type": "integer"}}}),
        ("anything", {}),
        ("é" * 3, {"type": "string", "maxLength": 3}),  # characters, not bytes
    ],
)
def test_valid_values(value, schema):
    validate_json(value, schema)


def test_the_first_violation_reported_does_not_depend_on_key_order():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    for value in ({"a": 1, "b": 2}, {"b": 2, "a": 1}):
        with pytest.raises(SchemaViolation, match=r"^\$\.a:"):
            validate_json(value, schema)


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"type": "object", "oneOf": []}, r"uses \['oneOf'\]"),
        ({"type": "thing"}, "unknown type 'thing'"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, r"\$\.a uses \['format'\]"),
        ({"type": "array", "items": {"pattern": "x"}}, r"\$\[\] uses"),
        ({"type": "object", "properties": {"a": "string"}}, "must be a JSON-schema object"),
    ],
)
def test_unsupported_schemas_are_refused(schema, match):
    with pytest.raises(umi.InvalidConfigError, match=match):
        check_schema(schema)


# hypothesis: values built from a schema are valid; each kind of breakage is caught
_text = st.text(string.ascii_letters + " .", min_size=1, max_size=40)


def _entity():
    return st.fixed_dictionaries(
        {"name": _text, "entity_type": st.sampled_from(schemas.ENTITY_TYPES), "content": _text},
        optional={"confidence": st.floats(0, 1)},
    )


_extraction = st.fixed_dictionaries({"entities": st.lists(_entity(), max_size=32)})


@settings(max_examples=150, deadline=None)
@given(_extraction)
def test_generated_extractions_are_valid(value):
    validate_json(value, schemas.EXTRACTION_SCHEMA)


@settings(max_examples=150, deadline=None)
@given(_extraction.filter(lambda v: v["entities"]), st.data())
def test_every_breakage_is_caught(value, data):
    i = data.draw(st.integers(0, len(value["entities"]) - 1))
    e = value["entities"][i]
    breakage = data.draw(st.sampled_from(["drop", "extra", "enum", "type", "range", "empty"]))
    if breakage == "drop":
        del e[data.draw(st.sampled_from(["name", "entity_type", "content"]))]
    elif breakage == "extra":
        e["age"] = 3
    elif breakage == "enum":
        e["entity_type"] = data.draw(_text.filter(lambda s: s not in schemas.ENTITY_TYPES))
    elif breakage == "type":
        e["name"] = data.draw(st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers())))
    elif breakage == "range":
        e["confidence"] = data.draw(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.000001)))
    else:
        e["content"] = ""
    with pytest.raises(SchemaViolation, match=rf"^\$\.entities\[{i}\]"):
        validate_json(value, schemas.EXTRACTION_SCHEMA)


# --- JSON out of model text --------------------------------------------------------------------------

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_objects = st.dictionaries(st.text(max_size=8), _json, min_size=1, max_size=4)
_prose = st.text(alphabet=st.characters(blacklist_characters="{}`[]\"", blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_objects, _prose, _prose, st.sampled_from(["bare", "prose", "fence-json", "fence-plain"]), st.booleans())
def test_an_object_in_text_is_recovered(obj, before, after, wrap, indent):
    body = json.dumps(obj, indent=2 if indent else None, ensure_ascii=bool(indent))
    text = {
        "bare": body,
        "prose": f"{before} {body} {after}",
        "fence-json": f"{before}\n```json\n{body}\n```\n{after}",
        "fence-plain": f"{before}\n```\n{body}\n```{after}",
    }[wrap]
    assert next(iter_json_objects(text)) == obj


def test_only_objects_and_no_nan():
    assert list(iter_json_objects('[1, 2] and "str" and 3')) == []
    assert list(iter_json_objects('{"a": NaN}')) == []
    assert list(iter_json_objects('{"a": 1} then {"b": 2}')) == [{"a": 1}, {"b": 2}]
    assert list(iter_json_objects('{"a": {"b": 1}}')) == [{"a": {"b": 1}}]  # the inner object is not listed again


def test_parse_json_reply_prefers_the_first_matching_object():
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    assert parse_json_reply('{"x": 1} no, I mean {"q": "ok"}', schema) == {"q": "ok"}
    with pytest.raises(SchemaViolation, match="missing required property 'q'"):
        parse_json_reply('{"x": 1} {"y": 2}', schema)
    with pytest.raises(ValueError, match="no JSON object found"):
        parse_json_reply("nothing here {", schema)


def test_pathological_text_is_bounded():
    text = "{" * 200_000  # every '{' starts a failed decode; only the first 64 are tried
    assert list(iter_json_objects(text)) == []


# --- retry-after and backoff -----------------------------------------------------------------------------


def test_parse_retry_after():
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "inf"}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=lambda: now) == 7.0
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=lambda: now) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2000), st.floats(0.01, 5), st.floats(0.01, 60), st.floats(0, 120), st.integers(0, 2**32))
def test_backoff_is_exponential_capped_and_jittered_down(n, base, max_delay, max_wait, seed):
    policy = RetryPolicy(base_delay_secs=base, max_delay_secs=max_delay, max_wait_secs=max_wait,
                         rng=random.Random(seed))
    d = policy.delay(n, None)
    full = min(base * 2.0 ** min(n, 30), max_delay)
    assert min(0.75 * full, max_wait) <= d + 1e-12 and d <= min(full, max_wait) + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.floats(-10, 1e7, allow_nan=False), st.floats(0, 3600))
def test_retry_after_is_honoured_up_to_the_cap(retry_after, cap):
    assert RetryPolicy(max_wait_secs=cap).delay(5, retry_after) == min(max(retry_after, 0.0), cap)


def test_jitter_is_reproducible_with_a_seeded_rng():
    a = [RetryPolicy(rng=random.Random(3)).delay(i, None) for i in range(5)]
    b = [RetryPolicy(rng=random.Random(3)).delay(i, None) for i in range(5)]
    assert a == b


# --- classifying SDK exceptions and mapping them to umi errors -----------------------------------------


def _status_error(sdk, status, headers=None, body=None):
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return sdk.APIStatusError(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "headers", "retryable"),
    [
        (429, {}, True), (529, {}, True), (500, {}, True), (503, {}, True), (408, {}, True), (409, {}, True),
        (400, {}, False), (401, {}, False), (403, {}, False), (404, {}, False), (422, {}, False),
        (500, {"x-should-retry": "false"}, False), (400, {"x-should-retry": "true"}, True),
    ],
)
@pytest.mark.parametrize("sdk", [anthropic, openai], ids=["anthropic", "openai"])
def test_which_statuses_are_retried(sdk, status, headers, retryable):
    f = classify_failure(_status_error(sdk, status, headers), sdk)
    assert (f.kind, f.status, f.retryable) == ("status", status, retryable)


def test_classify_reads_request_id_retry_after_and_the_error_body():
    exc = _status_error(anthropic, 529, {"request-id": "req_1", "retry-after": "2"},
                        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    f = classify_failure(exc, anthropic)
    assert (f.request_id, f.retry_after, f.error_type, f.detail) == ("req_1", 2.0, "overloaded_error", "Overloaded")
    exc = _status_error(openai, 429, {"x-request-id": "req_2"}, {"error": {"type": "requests", "message": "slow"}})
    assert classify_failure(exc, openai).request_id == "req_2"


def test_an_exhausted_quota_is_not_retried():
    body = {"error": {"type": "insufficient_quota", "code": "insufficient_quota",
                      "message": "You exceeded your current quota"}}
    f = classify_failure(_status_error(openai, 429, {}, body), openai)
    assert (f.status, f.retryable) == (429, False)
    err = failure_to_error(f, provider="openai", attempts=1, timeout_secs=1, key_env="OPENAI_API_KEY")
    assert type(err) is umi.RateLimitError and "exceeded your current quota" in str(err)


def test_classify_transport_failures_and_leaves_other_exceptions_alone():
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    assert classify_failure(anthropic.APITimeoutError(request), anthropic).kind == "timeout"
    assert classify_failure(anthropic.APIConnectionError(request=request), anthropic).kind == "connection"
    bad_json = json.JSONDecodeError("Expecting value", "<html>", 0)
    assert classify_failure(bad_json, openai) == Failure("response", False, detail=f"the response body is not JSON ({bad_json})")
    assert classify_failure(KeyError("x"), anthropic) is None
    assert classify_failure(ValueError("x"), openai) is None


@pytest.mark.parametrize(
    ("failure", "cls", "match"),
    [
        (Failure("timeout", True), umi.ProviderTimeoutError, "no answer within the 0.5 s timeout, after 3 attempts"),
        (Failure("status", True, status=529, error_type="overloaded_error", detail="Overloaded"), umi.RateLimitError,
         r"overloaded \(529 overloaded_error: Overloaded\)"),
        (Failure("status", True, status=429, detail="slow"), umi.RateLimitError, r"rate-limited \(429: slow\)"),
        (Failure("status", False, status=401, detail="invalid x-api-key"), umi.ProviderError, "MY_KEY_ENV"),
        (Failure("status", False, status=403, detail="forbidden"), umi.ProviderError, "rejected the API key"),
        (Failure("status", True, status=502, detail="bad gateway"), umi.ProviderError, "HTTP 502: bad gateway"),
        (Failure("connection", True, detail="connection failed: refused"), umi.ProviderError, "refused, after 3"),
        (Failure("response", False, detail="not JSON"), umi.InvalidResponseError, "unusable response: not JSON"),
    ],
)
def test_failure_to_error(failure, cls, match):
    failure.request_id = "req_9"
    err = failure_to_error(failure, provider="p", attempts=3, timeout_secs=0.5, key_env="MY_KEY_ENV")
    assert type(err) is cls
    assert (err.status, err.request_id, err.provider) == (failure.status, "req_9", "p")
    assert err.args[0].startswith("p") and __import__("re").search(match, str(err))


def test_the_retry_loop_counts_attempts_and_chains_the_last_exception():
    calls = []
    waits = []

    def call():
        calls.append(1)
        raise _status_error(anthropic, 503)

    policy = RetryPolicy(max_retries=2, sleep=waits.append, rng=random.Random(0))
    with pytest.raises(umi.ProviderError, match="after 3 attempts") as info:
        _retry.call_with_retries(call, policy=policy, sdk=anthropic, provider="p", timeout_secs=1, key_env="K")
    assert len(calls) == 3 and len(waits) == 2
    assert isinstance(info.value.__cause__, anthropic.APIStatusError)


def test_unclassified_exceptions_pass_through_the_retry_loop_untouched():
    async def call():
        raise KeyError("bug")

    policy = RetryPolicy(max_retries=3)
    with pytest.raises(KeyError):
        asyncio.run(_retry.acall_with_retries(call, policy=policy, sdk=openai, provider="p", timeout_secs=1,
                                               key_env="K"))


# --- OpenAI strict schemas ---------------------------------------------------------------------------------


def _objects_in(schema):
    if "properties" in schema:
        yield schema
        for sub in schema["properties"].values():
            yield from _objects_in(sub)
    if "items" in schema:
        yield from _objects_in(schema["items"])


@pytest.mark.parametrize("task", sorted(schemas.SCHEMAS))
def test_strict_schemas_close_every_object_and_require_every_key(task):
    strict = strict_schema(schemas.SCHEMAS[task])
    for obj in _objects_in(strict):
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])
    assert "minLength" not in json.dumps(strict) and "maxLength" not in json.dumps(strict)
    assert schemas.SCHEMAS[task] == json.loads(json.dumps(schemas.SCHEMAS[task]))  # the original is untouched


@settings(max_examples=100, deadline=None)
@given(_extraction)
def test_strict_answers_map_back_to_valid_original_answers(value):
    # what a strict-mode model sends: every optional key present, null when it has no value
    strict_value = {"entities": [{**e, "confidence": e.get("confidence")} for e in value["entities"]]}
    validate_json(strict_value, {k: v for k, v in strict_schema(schemas.EXTRACTION_SCHEMA).items()})
    assert _drop_optional_nulls(strict_value, schemas.EXTRACTION_SCHEMA) == value


def test_required_nulls_are_not_dropped():
    value = {"entities": [{"name": None, "entity_type": "person", "content": "x"}]}
    assert _drop_optional_nulls(value, schemas.EXTRACTION_SCHEMA) == value


def test_nullable_enums_allow_null():
    s = strict_schema({"type": "object", "properties": {"k": {"type": "string", "enum": ["a", "b"]}}})
    assert s["properties"]["k"] == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert s["required"] == ["k"]


# --- per-loop async clients ------------------------------------------------------------------------------


class _FakeClient:
    def __init__(self):
        self.closed = False

    async def close(self):
        self.closed = True


def test_loop_clients_give_each_loop_its_own_client_and_close_them():
    made = []

    def factory():
        made.append(_FakeClient())
        return made[-1]

    clients = _sdk.LoopClients(factory)

    async def get_twice():
        a, b = clients.get(), clients.get()
        assert a is b
        return a

    first = asyncio.run(get_twice())
    loop = asyncio.new_event_loop()
    try:
        second = loop.run_until_complete(get_twice())
        assert second is not first and len(made) == 2
        clients.close_all()  # the first loop is closed: its client is dropped; the second is closed on its loop
        assert (first.closed, second.closed) == (False, True)
        third = loop.run_until_complete(get_twice())
        assert third is not second
        loop.run_until_complete(clients.aclose_current())
        assert third.closed
    finally:
        loop.close()


def test_misc_checks():
    assert _checks.check_timeout(2) == 2.0
    assert math.isclose(_checks.check_wait(0, "w"), 0.0)
    with pytest.raises(umi.InvalidConfigError, match="at most 256"):
        _checks.check_model("m" * 257)
    with pytest.raises(TypeError):
        _checks.check_base_url(b"http://x")
