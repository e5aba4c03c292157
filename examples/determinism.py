"""The Sim path is deterministic: same seed, same inputs -> same ids, scores and order."""

import umi


def run(seed: int) -> list:
    with umi.Memory.sim(seed=seed) as memory:
        memory.remember_sync("Alice works at Acme Corp")
        memory.remember_sync("Alice left Acme and now works at Initech")
        return [(e.id, round(e.score, 6)) for e in memory.recall_sync("Alice")]


first, second = run(7), run(7)
assert first == second, "same seed must give the same results"
print("identical across runs:", first == second, "-", len(first), "results")
