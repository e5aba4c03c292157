"""Helpers for driving providers in tests: sync or async calls, and a sleep recorder for retries."""

from __future__ import annotations

import asyncio
from typing import Any

API_KEY = "sk-test-0123456789"


class SleepRecorder:
    """Stands in for time.sleep / asyncio.sleep in a provider's RetryPolicy: records, does not wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, secs: float) -> None:
        self.waits.append(secs)

    async def asleep(self, secs: float) -> None:
        self.waits.append(secs)


def record_sleeps(provider: Any) -> SleepRecorder:
    rec = SleepRecorder()
    provider.retry.sleep = rec.sleep
    provider.retry.asleep = rec.asleep
    return rec


def run_llm(provider: Any, mode: str, system: str, prompt: str, schema: Any, task: str) -> Any:
    """One ``complete_json`` (sync) or ``acomplete_json`` on a fresh event loop (async), closing after."""
    if mode == "sync":
        return provider.complete_json(system, prompt, schema, task=task)

    async def go() -> Any:
        try:
            return await provider.acomplete_json(system, prompt, schema, task=task)
        finally:
            await provider.aclose()

    return asyncio.run(go())


def run_embed(provider: Any, mode: str, texts: Any, kind: str = "passage") -> Any:
    """One ``embed`` (sync) or ``aembed`` on a fresh event loop (async), closing after."""
    if mode == "sync":
        return provider.embed(texts, kind=kind)

    async def go() -> Any:
        try:
            return await provider.aembed(texts, kind=kind)
        finally:
            await provider.aclose()

    return asyncio.run(go())
