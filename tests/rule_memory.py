"""The setting of the rule-pipeline story tests: a Memory with no LLM (rule extraction and
evolution), the Sim store and embedder (64-d), on a Sim clock."""

import umi
from umi.providers.sim import SimEmbeddingProvider
from umi.sim.clock import SimClock
from umi.storage.sim import SimStorageBackend


def rules_memory(seed: int) -> umi.Memory:
    return umi.Memory(storage=SimStorageBackend(seed=seed), llm=None, embedder=SimEmbeddingProvider(seed, 64),
                      clock=SimClock(start_ms=1_700_000_000_000))
