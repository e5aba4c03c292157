"""The async API: remember and recall concurrently on one Memory (writes are serialised for you)."""

import asyncio

import umi


async def main() -> None:
    async with umi.Memory.sim(seed=42) as memory:
        facts = ["Bob lives in Berlin", "Carol manages Project Apollo", "Dan works at Globex Corp"]
        results = await asyncio.gather(*(memory.remember(f) for f in facts))
        print("stored:", sum(r.entity_count for r in results), "entities")
        berlin, apollo = await asyncio.gather(memory.recall("Who lives in Berlin?"), memory.recall("Apollo"))
        print("berlin:", [e.name for e in berlin])
        print("apollo:", [e.name for e in apollo])


asyncio.run(main())
