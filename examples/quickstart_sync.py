"""The embedded default, blocking API: a DuckDB file, the local embedder, rule extraction."""

import os
import tempfile

import umi

with tempfile.TemporaryDirectory() as tmp:
    with umi.Memory(os.path.join(tmp, "agent.duckdb")) as memory:
        memory.core.set_block("system", "You are a helpful assistant.")
        memory.core.set_block("human", "User prefers concise responses.", importance=0.9)
        memory.working.set("session_id", b"abc123")

        memory.remember_sync("Alice is a software engineer at Acme Corp")
        result = memory.remember_sync("Alice left Acme Corp and now works at Initech")
        print("evolutions:", [(ev.evolution_type.value, ev.reason) for ev in result.evolutions])

        for entity in memory.recall_sync("Where does Alice work?", umi.RecallOptions(limit=3)):
            print(f"{entity.score:.4f}  {entity.name}: {entity.content}")
        print(memory.core.render())
        assert memory.working.get("session_id") == b"abc123"
