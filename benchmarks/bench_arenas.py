"""bench_arenas: umi's compiled arenas against cachetools.TTLCache and a plain dict, in one run.

What it measures: ns per operation, written as a user writes it (``wm.get(k)``,
``cache[k] = v``, attribute lookup included) inside a ``for k in keys`` loop over
``--keys`` distinct keys (default 10,000), so every candidate pays the same loop
overhead. The cases run interleaved, round after round; each reports its best
round of ``--rounds``, since on a shared machine noise only ever adds time.

WorkingMemory (10,000 entries of a 8-byte key and a 100-byte value, a budget
that fits them, default C monotonic clock), side by side with
``cachetools.TTLCache(maxsize=keys, ttl=3600)`` and a plain ``dict``:

* **get, hit** — ``wm.get(k)`` / ``ttl.get(k)`` / ``d.get(k)`` on present keys;
* **get, miss** — the same on absent keys;
* **get, one hot key** — ``wm.get(k)`` on the same key every time (all in cache),
  the way MEASURED.md's single-statement figures (dict get about 50 ns) are taken;
* **set, replace** — ``wm.set(k, v)`` / ``ttl[k] = v`` / ``d[k] = v`` on present keys;
* **set, with eviction** — a store capped at ``keys // 10`` entries
  (``on_full="evict_lru"``; TTLCache's own size-based eviction) fed ``keys``
  distinct new keys, so every write evicts one entry (no dict equivalent);
* **get, hit, Python clock** — WorkingMemory with ``clock=time.monotonic``, to show
  what reading time through Python would cost.

CoreMemory with a full 32 KiB core (the six known blocks and eight others, 14
blocks, 32,768 content bytes of mixed text with characters to escape):

* **set_block** — replacing one 1 KiB block (alternating two contents);
* **render, unchanged** — ``render()`` again on the same state (cached string);
* **render after a change** — ``set_block`` + ``render()`` minus ``set_block``
  alone: re-escapes the changed block, concatenates 14 fragments, decodes UTF-8;
* **render markdown after a change** — the same for ``render("markdown")``;
* **pure-Python render** — the plain-Python XML render a user would otherwise write
  (str.replace escaping and join over the same blocks), for scale.

Targets (issue 2): WorkingMemory get and set at least 8x faster than TTLCache,
get within 2x of dict.get, render of a full core <= 10 us.

Results: a table on stdout and JSON in benchmarks/results/bench_arenas.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import timeit
from collections.abc import Callable, Mapping
from pathlib import Path

from cachetools import TTLCache

import umi

RESULTS = Path(__file__).parent / "results" / "bench_arenas.json"
KNOWN = ("system", "persona", "human", "facts", "goals", "scratch")


Case = tuple[str, dict, int, Callable[[], None] | None]


def best_ns(cases: Mapping[str, Case], rounds: int) -> dict[str, float]:
    """Interleave the cases round by round; per case keep the fastest round (ns/op).

    A case is (statement, namespace, ops per run, reset): reset (untimed) restores
    its state before each timed run, for cases that consume state (eviction).
    """
    timers = {
        name: (timeit.Timer(stmt, globals=ns), ops, reset)
        for name, (stmt, ns, ops, reset) in cases.items()
    }
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, (timer, ops, reset) in timers.items():
            if reset is not None:
                reset()
            best[name] = min(best[name], timer.timeit(number=1) * 1e9 / ops)
    return best


def bench_working(n_keys: int, rounds: int) -> dict[str, dict[str, float | None]]:
    keys = [f"key{i:05d}" for i in range(n_keys)]
    missing = [f"nokey{i:05d}" for i in range(n_keys)]
    value = b"v" * 100
    budget = max(1 << 20, 2 * n_keys * (len(keys[0]) + len(value)))

    wm = umi.WorkingMemory(max_bytes=budget, max_entries=n_keys)
    wm_py = umi.WorkingMemory(max_bytes=budget, max_entries=n_keys, clock=time.monotonic)
    ttl: TTLCache[str, bytes] = TTLCache(maxsize=n_keys, ttl=3600)
    d: dict[str, bytes] = {}
    for k in keys:
        wm.set(k, value)
        wm_py.set(k, value)
        ttl[k] = value
        d[k] = value

    # Eviction: stores holding `cap` entries, fed n_keys new keys.
    cap = max(1, n_keys // 10)
    # The timers read these namespaces at run time, so reset can swap stores in.
    ev_umi: dict[str, object] = {"keys": [f"new{i:05d}" for i in range(n_keys)], "v": value}
    ev_ttl: dict[str, object] = dict(ev_umi)

    def reset_evict() -> None:
        w = umi.WorkingMemory(max_bytes=budget, max_entries=cap, on_full="evict_lru")
        t: TTLCache[str, bytes] = TTLCache(maxsize=cap, ttl=3600)
        for k in keys[:cap]:
            w.set(k, value)
            t[k] = value
        ev_umi["wm"], ev_ttl["ttl"] = w, t

    ns = {
        "wm": wm,
        "wm_py": wm_py,
        "ttl": ttl,
        "d": d,
        "keys": keys,
        "missing": missing,
        "v": value,
        "k0": keys[n_keys // 2],
        "reps": range(n_keys),
    }
    n = n_keys
    cases = {
        "get_hit/umi": ("for k in keys: wm.get(k)", ns, n, None),
        "get_hit/ttlcache": ("for k in keys: ttl.get(k)", ns, n, None),
        "get_hit/dict": ("for k in keys: d.get(k)", ns, n, None),
        "get_miss/umi": ("for k in missing: wm.get(k)", ns, n, None),
        "get_miss/ttlcache": ("for k in missing: ttl.get(k)", ns, n, None),
        "get_miss/dict": ("for k in missing: d.get(k)", ns, n, None),
        "get_hot/umi": ("for _ in reps: wm.get(k0)", ns, n, None),
        "get_hot/ttlcache": ("for _ in reps: ttl.get(k0)", ns, n, None),
        "get_hot/dict": ("for _ in reps: d.get(k0)", ns, n, None),
        "set/umi": ("for k in keys: wm.set(k, v)", ns, n, None),
        "set/ttlcache": ("for k in keys: ttl[k] = v", ns, n, None),
        "set/dict": ("for k in keys: d[k] = v", ns, n, None),
        "set_evict/umi": ("for k in keys: wm.set(k, v)", ev_umi, n, reset_evict),
        "set_evict/ttlcache": ("for k in keys: ttl[k] = v", ev_ttl, n, reset_evict),
        "get_hit_pyclock/umi": ("for k in keys: wm_py.get(k)", ns, n, None),
    }
    best = best_ns(cases, rounds)
    assert wm.used_bytes <= wm.max_bytes and len(wm) == n_keys
    rows: dict[str, dict[str, float | None]] = {}
    for op in ["get_hit", "get_miss", "get_hot", "set", "set_evict", "get_hit_pyclock"]:
        rows[op] = {
            "umi": best[f"{op}/umi"],
            "ttlcache": best.get(f"{op}/ttlcache"),
            "dict": best.get(f"{op}/dict"),
        }
    return rows


def full_core() -> tuple[umi.CoreMemory, list[tuple[str, str, float]]]:
    core = umi.CoreMemory()
    unit = "The user's name is Zoë; she likes <b>bold</b> & short answers.\n## not a heading\n"
    blocks: list[tuple[str, str, float]] = []
    labels = list(KNOWN) + [f"note{i}" for i in range(8)]
    per_block = core.max_bytes // len(labels)
    for i, label in enumerate(labels):
        size = per_block if i < len(labels) - 1 else core.max_bytes - per_block * (len(labels) - 1)
        text = (unit * (size // len(unit.encode()) + 1)).encode()[:size].decode("utf-8", "ignore")
        text += "x" * (size - len(text.encode()))
        blocks.append((label, text, round(0.1 + i * 0.05, 2)))
        core.set_block(label, text, importance=blocks[-1][2])
    assert core.used_bytes == core.max_bytes
    return core, blocks


def python_render(blocks: list[tuple[str, str, float]]) -> str:
    order = sorted(blocks, key=lambda b: KNOWN.index(b[0]) if b[0] in KNOWN else len(KNOWN))
    parts = ["<core_memory>\n"]
    for label, content, imp in order:
        esc = content.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        parts.append(f'<block label="{label}" importance="{imp:.2f}">\n{esc}\n</block>\n')
    parts.append("</core_memory>")
    return "".join(parts)


def bench_core(rounds: int) -> dict[str, float]:
    core, blocks = full_core()
    assert python_render(blocks) == core.render()
    scratch = core.get_block("scratch")
    assert scratch is not None
    alt = [scratch, scratch[::-1].encode("utf-8", "ignore").decode("utf-8", "ignore")]
    alt[1] = alt[1][: len(alt[0])]
    alt[1] += "y" * (len(alt[0].encode()) - len(alt[1].encode()))
    reps = 2000
    ns = {"core": core, "alt": alt, "reps": reps, "blocks": blocks, "python_render": python_render}
    cases = {
        "set_block": (
            "for i in range(reps): core.set_block('scratch', alt[i & 1])",
            ns,
            reps,
            None,
        ),
        "set_block+render": (
            ("for i in range(reps): core.set_block('scratch', alt[i & 1]); core.render()"),
            ns,
            reps,
            None,
        ),
        "set_block+render_md": (
            (
                "for i in range(reps): core.set_block('scratch', alt[i & 1]); "
                "core.render('markdown')"
            ),
            ns,
            reps,
            None,
        ),
        "render_cached": ("for i in range(reps): core.render()", ns, reps, None),
        "python_render": ("for i in range(20): python_render(blocks)", ns, 20, None),
    }
    best = best_ns(cases, rounds)
    return {
        "set_block": best["set_block"],
        "render_unchanged": best["render_cached"],
        "render_after_change": best["set_block+render"] - best["set_block"],
        "render_markdown_after_change": best["set_block+render_md"] - best["set_block"],
        "python_render": best["python_render"],
        "render_bytes": len(core.render().encode()),
    }


def fmt_ns(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f} ns" if x < 10_000 else f"{x / 1000:,.1f} µs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    wm_rows = bench_working(args.keys, args.rounds)
    core_rows = bench_core(args.rounds)

    labels = {
        "get_hit": "get (hit)",
        "get_miss": "get (miss)",
        "get_hot": "get (hit), one hot key",
        "set": "set (replace)",
        "set_evict": "set with LRU eviction",
        "get_hit_pyclock": "get (hit), clock=time.monotonic",
    }
    print(f"WorkingMemory, {args.keys:,} keys, 100-byte values; best of {args.rounds} rounds")
    print()
    print("| operation | umi.WorkingMemory | cachetools.TTLCache | dict | vs TTLCache | vs dict |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, row in wm_rows.items():
        u, t, d = row["umi"], row["ttlcache"], row["dict"]
        assert u is not None
        vs_t = f"{t / u:.1f}× faster" if t else "—"
        vs_d = f"{u / d:.2f}× dict" if d else "—"
        print(f"| {labels[op]} | {fmt_ns(u)} | {fmt_ns(t)} | {fmt_ns(d)} | {vs_t} | {vs_d} |")
    print()
    print(f"CoreMemory, full 32 KiB core (14 blocks, {core_rows['render_bytes']:,} bytes rendered)")
    print()
    print("| operation | time |")
    print("|---|---:|")
    print(f"| set_block (1 KiB block replaced) | {fmt_ns(core_rows['set_block'])} |")
    print(f"| render() xml, unchanged state | {fmt_ns(core_rows['render_unchanged'])} |")
    print(f"| render() xml after one block changed | {fmt_ns(core_rows['render_after_change'])} |")
    print(
        '| render("markdown") after one block changed | '
        f"{fmt_ns(core_rows['render_markdown_after_change'])} |"
    )
    print(f"| plain-Python xml render (for scale) | {fmt_ns(core_rows['python_render'])} |")

    def ratio(op: str, a: str, b: str) -> float:
        x, y = wm_rows[op][a], wm_rows[op][b]
        assert x is not None and y is not None
        return x / y

    get_vs_ttl = ratio("get_hit", "ttlcache", "umi")
    set_vs_ttl = ratio("set", "ttlcache", "umi")
    get_vs_dict = ratio("get_hit", "umi", "dict")
    render_us = core_rows["render_after_change"] / 1000
    targets = {
        "get >= 8x TTLCache": get_vs_ttl >= 8,
        "set >= 8x TTLCache": set_vs_ttl >= 8,
        "get within 2x dict.get": get_vs_dict <= 2,
        "render full core (after a change) <= 10 us": render_us <= 10,
    }
    print()
    for name, ok in targets.items():
        print(f"{'met ' if ok else 'MISSED'}  {name}")

    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {
                    "benchmark": "bench_arenas",
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "machine": platform.machine(),
                    "keys": args.keys,
                    "rounds": args.rounds,
                    "unit": "ns per operation (best round)",
                    "working_memory": wm_rows,
                    "core_memory": core_rows,
                    "targets": targets,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
