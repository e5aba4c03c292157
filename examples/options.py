"""Options and config: keyword constructors and chainable builders, filters, history."""

import umi
from umi import RecallOptions, RememberOptions

config = umi.MemoryConfig(recall_limit=5).with_core_memory_bytes(8 * 1024)
with umi.Memory.sim(seed=1, config=config) as memory:
    memory.remember_sync("Erin plays the violin", RememberOptions(metadata={"session": "mon"}))
    memory.remember_sync("Raw meeting notes: ship v2 Friday", RememberOptions().without_extraction().with_importance(0.9))
    memory.remember_sync("Erin no longer plays the violin; she now plays cello", RememberOptions(metadata={"session": "tue"}))

    print("current:", [e.content for e in memory.recall_sync("Erin")])
    print("with history:", [e.content for e in memory.recall_sync("Erin", RecallOptions().with_superseded())])
    print("tuesday only:", [e.content for e in memory.recall_sync("Erin", RecallOptions(metadata={"session": "tue"}))])
    print("notes:", [e.name for e in memory.recall_sync("ship v2", RecallOptions().with_entity_types("note").fast_only())])
    print("core budget:", memory.core.max_bytes)
