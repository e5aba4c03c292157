"""Concurrent remembers/recalls on one Memory end in the same state as running them one by one."""

import asyncio
import threading

import umi

TEXTS = [f"Person{i} works at Company{i % 5} Corp and likes topic{i % 7}" for i in range(24)]


def state(m):
    ents = sorted((e.id, e.name, e.content, e.valid_to is None) for e in m.storage.iter_all())
    return ents


def sequential():
    with umi.Memory.sim(seed=11) as m:
        for t in TEXTS:
            m.remember_sync(t)
        return state(m)


def test_gather_of_remembers_and_recalls_matches_sequential():
    async def main():
        async with umi.Memory.sim(seed=11) as m:
            jobs = []
            for i, t in enumerate(TEXTS):
                jobs.append(m.remember(t))
                if i % 3 == 0:
                    jobs.append(m.recall("Company1 Corp"))
            results = await asyncio.gather(*jobs)
            assert sum(isinstance(r, umi.RememberResult) for r in results) == len(TEXTS)
            return state(m)

    assert asyncio.run(main()) == sequential()


def test_sync_twins_from_threads_match_sequential():
    errors = []
    with umi.Memory.sim(seed=11) as m:
        def worker(chunk):
            try:
                for t in chunk:
                    m.remember_sync(t)
                    m.recall_sync("topic3")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(TEXTS[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        got = state(m)
    assert got == sequential()
