"""OpenAIEmbeddingProvider driven through the real ``openai`` SDK against a loopback embeddings API."""

from __future__ import annotations

import numpy as np
import pytest
from loopback_api import (
    OPENAI_EMBEDDINGS,
    Reply,
    embeddings_responder,
    openai_embeddings,
    openai_error,
    text_vector,
)
from provider_harness import API_KEY, record_sleeps, run_embed

import umi


@pytest.fixture
def make(api, closing):
    def make(**kw):
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("base_url", api.openai_url)
        kw.setdefault("timeout", 5.0)
        return closing(umi.OpenAIEmbeddingProvider(**kw))

    return make


def expected(texts, dim):
    v = np.stack([text_vector(t, dim) for t in texts])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vectors_come_back_normalised_in_input_order_whatever_order_the_api_lists_them(api, make, mode):
    api.set_default(OPENAI_EMBEDDINGS, embeddings_responder(reverse=True))
    texts = ["Alice works at Acme", "Bob lives in Berlin", "Carol likes tea"]
    p = make()
    assert p.dim == 1536
    out = run_embed(p, mode, texts)
    assert out.dtype == np.float32 and out.shape == (3, 1536)
    np.testing.assert_allclose(out, expected(texts, 1536), rtol=0, atol=1e-6)
    (req,) = api.requests_to(OPENAI_EMBEDDINGS)
    assert req.error is None
    assert req.headers["authorization"] == f"Bearer {API_KEY}"
    assert (req.headers["x-stainless-async"] != "false") == (mode == "async")
    assert req.body["input"] == texts
    assert req.body["model"] == "text-embedding-3-small"
    assert req.body["encoding_format"] == "base64"
    assert "dimensions" not in req.body  # native size: nothing to shorten
    assert p.usage == umi.Usage(input_tokens=11, calls=1)


def test_float_lists_are_accepted_too(api, make):
    # OpenAI-compatible servers may ignore encoding_format and send floats
    vecs = [np.arange(1, 1537, dtype=np.float32), np.ones(1536, dtype=np.float32)]
    api.script(OPENAI_EMBEDDINGS, Reply(200, openai_embeddings(vecs, encoding_format="float")))
    out = make().embed(["a", "b"])
    np.testing.assert_allclose(out, np.stack([v / np.linalg.norm(v) for v in vecs]), atol=1e-6)


def test_a_batch_larger_than_the_chunk_size_is_split_and_reassembled_in_order(api, make, mode):
    api.set_default(OPENAI_EMBEDDINGS, embeddings_responder(reverse=True))
    texts = [f"fact number {i}" for i in range(23)]
    out = run_embed(make(batch_size=5, dimensions=256), mode, texts)
    np.testing.assert_allclose(out, expected(texts, 256), atol=1e-6)
    reqs = api.requests_to(OPENAI_EMBEDDINGS)
    assert [len(r.body["input"]) for r in reqs] == [5, 5, 5, 5, 3]
    assert [t for r in reqs for t in r.body["input"]] == texts
    assert all(r.body["dimensions"] == 256 for r in reqs)  # a shortened -3 model sends dimensions


def test_long_texts_are_split_by_characters_too(api, make):
    api.set_default(OPENAI_EMBEDDINGS, embeddings_responder())
    texts = ["a" * 100_000 + str(i) for i in range(5)]  # 500k chars: over the 250k-per-request budget
    out = make(batch_size=100).embed(texts)
    assert out.shape == (5, 1536)
    assert [len(r.body["input"]) for r in api.requests_to(OPENAI_EMBEDDINGS)] == [2, 2, 1]


def test_the_wrong_dimension_is_an_embedding_error(api, make, mode):
    api.script(OPENAI_EMBEDDINGS, Reply(200, openai_embeddings([np.ones(1536), np.ones(1024)],
                                                               encoding_format="base64"),
                                        {"x-request-id": "req_emb_9"}))
    with pytest.raises(umi.EmbeddingError, match="vector 1 has 1024 dimensions, expected 1536.*req_emb_9"):
        run_embed(make(), mode, ["a", "b"])


@pytest.mark.parametrize("fmt", ["base64", "float"])
def test_nan_in_an_embedding_is_an_embedding_error(api, make, mode, fmt):
    v = np.ones(1536, dtype=np.float32)
    v[7] = np.nan
    api.script(OPENAI_EMBEDDINGS, Reply(200, openai_embeddings([np.ones(1536), v], encoding_format=fmt)))
    with pytest.raises(umi.EmbeddingError, match="vector 1 holds NaN or infinite values"):
        run_embed(make(), mode, ["a", "b"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (openai_embeddings([np.ones(1536)]), "asked for 2 vectors, got 1"),
        (openai_embeddings([np.ones(1536), np.ones(1536)], labels=[0, 0]), "index 0 is out of range .* or repeated"),
        (openai_embeddings([np.ones(1536), np.ones(1536)], labels=[0, 2]), "index 2 is out of range"),
        (openai_embeddings([np.ones(1536), np.zeros(1536)]), "vector 1 is all zeros"),
        ({"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0, "embedding": "!!notb64"},
                                                   {"object": "embedding", "index": 1, "embedding": "AAAA"}]},
         "could not be decoded"),
    ],
    ids=["too-few", "repeated-index", "index-out-of-range", "zero-vector", "bad-base64"],
)
def test_unusable_vectors_are_embedding_errors(api, make, body, match):
    api.script(OPENAI_EMBEDDINGS, Reply(200, body))
    with pytest.raises(umi.EmbeddingError, match=match):
        make().embed(["a", "b"])


def test_a_failed_chunk_fails_the_whole_call(api, make):
    good = embeddings_responder()
    api.script(OPENAI_EMBEDDINGS, good, Reply(200, openai_embeddings([np.ones(7), np.ones(7)])))
    p = make(batch_size=2)
    with pytest.raises(umi.EmbeddingError, match="7 dimensions"):
        p.embed(["a", "b", "c", "d"])
    assert p.usage.calls == 1  # only the request that delivered usable vectors is counted


def test_rate_limit_then_success_and_storm(api, make, mode):
    api.script(OPENAI_EMBEDDINGS, Reply(429, openai_error("requests", "Rate limit reached"), {"retry-after": "0.05"}))
    api.set_default(OPENAI_EMBEDDINGS, embeddings_responder())
    p = make(max_retries=1)
    rec = record_sleeps(p)
    assert run_embed(p, mode, ["a"]).shape == (1, 1536)
    assert rec.waits == [0.05]


def test_rate_limit_storm_is_a_rate_limit_error(api, make, mode):
    api.script(OPENAI_EMBEDDINGS, *[Reply(429, openai_error("requests", "Rate limit reached")) for _ in range(3)])
    p = make(max_retries=2)
    record_sleeps(p)
    with pytest.raises(umi.RateLimitError) as info:
        run_embed(p, mode, ["a"])
    assert info.value.status == 429 and info.value.request_id


def test_timeout(api, make, mode):
    api.script(OPENAI_EMBEDDINGS, Reply(200, openai_embeddings([np.ones(1536)]), delay_secs=10))
    with pytest.raises(umi.ProviderTimeoutError):
        run_embed(make(timeout=0.3, max_retries=0), mode, ["a"])


def test_no_texts_make_no_request(api, make, mode):
    out = run_embed(make(dimensions=64), mode, [])
    assert out.shape == (0, 64) and out.dtype == np.float32
    assert api.requests == []


@pytest.mark.parametrize(
    ("texts", "kind", "exc", "match"),
    [
        ("just one string", "passage", TypeError, "sequence of str"),
        (["ok", 3], "passage", TypeError, r"texts\[1\] must be a str"),
        (["ok", "  "], "passage", umi.ValidationError, r"texts\[1\] is empty"),
        (["ok"], "document", umi.ValidationError, "kind must be 'passage' or 'query'"),
        (["x" * 250_001], "passage", umi.ValidationError, "at most 250000"),
    ],
)
def test_bad_inputs_send_nothing(api, make, mode, texts, kind, exc, match):
    with pytest.raises(exc, match=match):
        run_embed(make(), mode, texts, kind)
    assert api.requests == []


@pytest.mark.parametrize(
    ("kwargs", "dim"),
    [
        ({}, 1536),
        ({"model": "text-embedding-3-large"}, 3072),
        ({"model": "text-embedding-3-large", "dimensions": 1024}, 1024),
        ({"model": "text-embedding-ada-002"}, 1536),
        ({"model": "nomic-embed-text", "dimensions": 768}, 768),
    ],
)
def test_dim_is_known_at_construction(kwargs, dim):
    p = umi.OpenAIEmbeddingProvider(api_key=API_KEY, **kwargs)
    assert p.dim == dim


def test_dimensions_is_only_sent_to_models_that_shorten(api, make):
    api.set_default(OPENAI_EMBEDDINGS, embeddings_responder(dim=768))
    make(model="nomic-embed-text", dimensions=768).embed(["a"])
    assert "dimensions" not in api.requests_to(OPENAI_EMBEDDINGS)[0].body


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"model": "nomic-embed-text"}, umi.InvalidConfigError, "pass dimensions="),
        ({"model": "text-embedding-ada-002", "dimensions": 512}, umi.InvalidConfigError, "cannot shorten"),
        ({"dimensions": 4000}, umi.InvalidConfigError, r"dimensions must be in \[1, 1536\]"),
        ({"dimensions": 0}, umi.InvalidConfigError, "dimensions"),
        ({"batch_size": 2049}, umi.InvalidConfigError, r"batch_size must be in \[1, 2048\]"),
        ({"batch_size": "10"}, TypeError, "batch_size must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        umi.OpenAIEmbeddingProvider(api_key=API_KEY, **kwargs)


def test_missing_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(umi.ProviderError, match="OPENAI_API_KEY"):
        umi.OpenAIEmbeddingProvider()
