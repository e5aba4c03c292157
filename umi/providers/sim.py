"""Seeded, deterministic Sim providers: real implementations of the provider protocols.

``SimLLMProvider`` answers the three umi tasks by rules (see
:mod:`umi.pipeline.extraction`, :mod:`umi.pipeline.evolution`,
:mod:`umi.pipeline.retrieval`), returning the same JSON shape a real model returns,
so every branch of every pipeline runs without a network. It reads its input back
out of the prompt, so it only understands umi's own prompts. A ``FaultInjector``
makes it fail like a real provider (timeouts, rate limits, invalid output).

``SimEmbeddingProvider`` hashes tokens (and character trigrams, at lower weight)
into a seeded signed random projection: texts that share words are closer than
texts that do not.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import EmbeddingError, InvalidResponseError, ProviderTimeoutError, RateLimitError
from ..pipeline.evolution import Candidate, rule_classify
from ..pipeline.extraction import rule_extract
from ..pipeline.retrieval import rule_rewrite
from ..pipeline.schemas import read_tag
from ..types import Usage
from .base import EmbeddingProvider, EmbedKind, LLMProvider, LLMResult, Task

__all__ = ["SimLLMProvider", "SimEmbeddingProvider"]

_TOKEN = re.compile(r"[a-z0-9]+")
_EMB_STOP = frozenset("a an the is are was were be of to in on at and or for with as by it its".split())


def _fault(faults: Any, name: str) -> bool:
    if faults is None:
        return False
    from ..sim.faults import FaultType

    return bool(faults.should_fail(getattr(FaultType, name)))


class SimLLMProvider(LLMProvider):
    """A deterministic LLM for tests and simulation. ``seed`` varies confidences and rewrites' order."""

    name = "sim"

    def __init__(self, seed: int = 42, *, faults: Any = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        self.seed = seed
        self.faults = faults
        self.calls: dict[str, int] = {"extract_entities": 0, "rewrite_query": 0, "classify_evolution": 0}

    def _jitter(self, key: str) -> float:
        """A seeded, input-determined value in [0, 0.05): same seed and input, same value."""
        h = hashlib.blake2b(f"{self.seed}\x1f{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64 * 0.05

    def complete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        if task not in self.calls:
            raise InvalidResponseError(f"SimLLMProvider does not know task {task!r}", provider="sim")
        self.calls[task] += 1
        if _fault(self.faults, "LLM_TIMEOUT"):
            raise ProviderTimeoutError(f"sim: {task} timed out (injected)", provider="sim")
        if _fault(self.faults, "LLM_RATE_LIMIT"):
            raise RateLimitError(f"sim: {task} rate-limited (injected)", status=429, provider="sim")
        if _fault(self.faults, "LLM_INVALID_RESPONSE"):
            raise InvalidResponseError(f"sim: {task} answered with invalid JSON (injected)", provider="sim")
        data = self._answer(prompt, task)
        usage = Usage(
            input_tokens=(len(system) + len(prompt)) // 4,
            output_tokens=len(json.dumps(data)) // 4,
            calls=1,
        )
        return LLMResult(data=data, usage=usage)

    def _answer(self, prompt: str, task: Task) -> dict[str, Any]:
        if task == "extract_entities":
            text = read_tag(prompt, "text")
            ents = rule_extract(text)
            return {
                "entities": [
                    {
                        "name": e.name,
                        "entity_type": e.entity_type.value,
                        "content": e.content,
                        "confidence": round(min(1.0, e.confidence + self._jitter(e.name + e.content)), 4),
                    }
                    for e in ents
                ]
            }
        if task == "rewrite_query":
            query = read_tag(prompt, "query")
            variants = rule_rewrite(query) or [query]
            rng = random.Random(f"{self.seed}\x1f{query}")
            if len(variants) > 2:  # seed-dependent order past the first, as a model would vary
                tail = variants[1:]
                rng.shuffle(tail)
                variants = [variants[0], *tail]
            return {"queries": variants}
        # classify_evolution
        try:
            new = json.loads(read_tag(prompt, "new_fact"))
            olds = json.loads(read_tag(prompt, "older_facts"))
        except json.JSONDecodeError as exc:
            raise InvalidResponseError("sim: evolution prompt is not umi's format", provider="sim") from exc
        new_c = Candidate(new["id"], new["name"], new["entity_type"], new["content"])
        cands = [Candidate(o["id"], o["name"], o["entity_type"], o["content"]) for o in olds]
        decisions = {d.candidate_id: d for d in rule_classify(new_c, cands)}
        rels = []
        for c in cands:
            d = decisions.get(c.id)
            if d is None:
                rels.append({"candidate_id": c.id, "evolution_type": "none", "reason": "unrelated", "confidence": 0.9})
            else:
                conf = round(min(1.0, d.confidence + self._jitter(c.id + new_c.id)), 4)
                rels.append({"candidate_id": c.id, "evolution_type": d.evolution_type.value,
                             "reason": d.reason, "confidence": conf})
        return {"relations": rels}


class SimEmbeddingProvider(EmbeddingProvider):
    """Token-hashed embeddings, L2-normalised, seeded. No model, no network, microseconds per text."""

    name = "sim"

    def __init__(self, seed: int = 42, dim: int = 384, *, faults: Any = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 8 <= dim <= 4096:
            from ..errors import InvalidConfigError

            raise InvalidConfigError(f"dim must be an int in [8, 4096], got {dim!r}")
        self.seed = seed
        self.dim = dim
        self.faults = faults
        self.calls = 0
        self._cache: dict[str, np.ndarray] = {}

    def _feature(self, feat: str) -> np.ndarray:
        v = self._cache.get(feat)
        if v is None:
            h = hashlib.blake2b(f"{self.seed}\x1f{feat}".encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(h, "little"))
            v = rng.standard_normal(self.dim).astype(np.float32)
            if len(self._cache) < 200_000:
                self._cache[feat] = v
        return v

    def _one(self, text: str) -> np.ndarray:
        acc = np.zeros(self.dim, dtype=np.float32)
        toks = [t for t in _TOKEN.findall(text.lower())]
        words = [t for t in toks if t not in _EMB_STOP] or toks
        for w in words:
            acc += self._feature("w:" + w)
            stem = w[:5]
            if stem != w:
                acc += 0.5 * self._feature("s:" + stem)
        squashed = " ".join(words)
        for i in range(max(0, len(squashed) - 2)):
            acc += 0.15 * self._feature("c:" + squashed[i : i + 3])
        n = float(np.linalg.norm(acc))
        if n == 0.0:
            acc = self._feature("empty")
            n = float(np.linalg.norm(acc))
        return acc / n

    def embed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError("texts must be a sequence of str")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        if kind not in ("passage", "query"):
            raise ValueError(f"kind must be 'passage' or 'query', got {kind!r}")
        self.calls += 1
        if _fault(self.faults, "EMBEDDING_FAIL"):
            raise EmbeddingError("sim: embedding failed (injected)")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self._one(t)
        return out

    async def aembed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        """Inline: hashing a few texts costs microseconds, less than a hop to a worker thread."""
        return self.embed(texts, kind=kind)
