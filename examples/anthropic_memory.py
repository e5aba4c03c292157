"""Memory on Claude: real extraction and evolution detection, with token usage per call.

Needs ``pip install "umi[anthropic]"`` and an API key:

    export ANTHROPIC_API_KEY=sk-ant-...
    export OPENAI_API_KEY=sk-...        # optional: OpenAI embeddings instead of the local embedder
    python examples/anthropic_memory.py

Without ANTHROPIC_API_KEY it explains what it would do and exits 0 (it never calls the
network then). With a key, it makes about 5 small API calls (a fraction of a cent on
claude-haiku-4-5): one extraction per remember, one evolution check for each new fact
that has older facts about the same thing, and one query rewrite for the deep recall.
The memory lives in a temporary DuckDB file that is deleted at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile

import umi

FACTS = [
    "Alice is a software engineer at Acme Corp. She lives in Lisbon.",
    "Alice left Acme Corp last month and now works as a product manager at Initech.",
]


def main() -> int:
    anthropic_key = os.environ.get("ANTHROPIC_API_KEY")
    openai_key = os.environ.get("OPENAI_API_KEY")  # None: the local offline embedder is used
    if not anthropic_key:
        print(__doc__)
        print("ANTHROPIC_API_KEY is not set, so nothing was sent. "
              "Try `python examples/quickstart_sync.py` for the offline, rule-based path.")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        try:
            memory = umi.Memory.with_anthropic(
                anthropic_key, openai_key=openai_key, db_path=os.path.join(tmp, "agent.duckdb"),
                max_retries=3, timeout=60.0,
            )
        except umi.ProviderNotInstalledError as exc:
            print(f"{exc}")  # names the extra to install
            return 1
        with memory:
            total = umi.Usage()
            for text in FACTS:
                result = memory.remember_sync(text)
                total.add(result.usage)
                print(f"\nremember: {text}")
                for e in result.entities:
                    print(f"  + {e.entity_type.value:<12} {e.name}: {e.content}")
                for ev in result.evolutions:
                    print(f"  ~ {ev.evolution_type.value}: {ev.reason} (confidence {ev.confidence:.2f})")
                for w in result.warnings:  # provider failures degrade (e.g. to one note) and say so here
                    print(f"  ! {w}")
                u = result.usage
                print(f"  usage: {u.calls} call(s), {u.input_tokens} in, {u.output_tokens} out, "
                      f"{u.cache_read_input_tokens} read from cache")

            print("\nrecall (current facts): Where does Alice work?")
            for e in memory.recall_sync("Where does Alice work?", umi.RecallOptions(limit=3)):
                print(f"  {e.score:.4f}  {e.name}: {e.content}")

            print("\nrecall (deep: Claude rewrites the query, history included): Alice's jobs")
            options = umi.RecallOptions(limit=5, include_superseded=True).with_deep_search()
            for e in memory.recall_sync("What jobs has Alice had?", options):
                state = "superseded" if e.valid_to is not None else "current"
                print(f"  {e.score:.4f}  [{state}] {e.content}")

            print(f"\ntotal for the remembers: {total.calls} calls, {total.input_tokens} input tokens "
                  f"(+{total.cache_read_input_tokens} cached), {total.output_tokens} output tokens")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except umi.ProviderError as exc:
        # after retries: a bad key (401), rate limits past max_retries, timeouts
        print(f"the Anthropic API call failed: {exc} (status {exc.status}, request id {exc.request_id})")
        sys.exit(1)
