"""Fuzz every public entry point with hostile values: every rejection is typed, nothing changes.

Each test draws hostile arguments (ints of any size, 10**400, NaN, ±inf, bools, floats for
ints, str with lone surrogates, bytes, containers, arbitrary objects) for one entry point
and asserts: the call either succeeds, or raises a :class:`umi.UmiError` or ``TypeError``
— never ``ValueError``, ``OverflowError``, ``UnicodeEncodeError``, ``RecursionError`` … —
and a rejected call leaves the object's observable state exactly as it was.

``COUNTS`` tallies tried / accepted / rejected per entry point; the last test prints the
table (``pytest -s``) and asserts that no untyped exception was seen.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi.errors import UmiError
from umi.storage.base import SearchFilters

COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "accepted": 0, "rejected": 0})
UNTYPED: list[str] = []

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(st.text(max_size=40), st.text(alphabet=st.one_of(SURROGATE, st.characters()), max_size=12))
NUMBER = st.one_of(
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324]),
)
HOSTILE = st.one_of(
    st.none(), st.booleans(), NUMBER, TEXT, st.binary(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from([object(), timedelta(seconds=-1), timedelta(days=10**6), np.float64("nan"), np.int64(5),
                     np.array([1.0, 2.0]), b"\xff", bytearray(b"x"), ()]),
)
METADATA = st.one_of(
    HOSTILE,
    st.dictionaries(TEXT, st.one_of(st.none(), st.booleans(), NUMBER, TEXT, st.binary(max_size=4)), max_size=4),
    st.just({f"k{i}": "v" for i in range(100)}), st.just({"big": "x" * 70_000}), st.just({"v": "x" * 9000}),
)


def attempt(entry: str, call: Callable[[], Any], state: Callable[[], Any] | None = None) -> Any:
    """Run one fuzzed call; typed rejection must leave ``state()`` unchanged."""
    c = COUNTS[entry]
    c["tried"] += 1
    before = state() if state is not None else None
    try:
        out = call()
    except (UmiError, TypeError):
        c["rejected"] += 1
        if state is not None:
            assert state() == before, f"{entry}: a rejected call changed the state"
        return None
    except Exception as exc:
        UNTYPED.append(f"{entry}: {type(exc).__name__}: {exc}")
        raise AssertionError(f"{entry} raised an untyped {type(exc).__name__}: {exc}") from exc
    c["accepted"] += 1
    return out


def without_surrogates(x: Any) -> bool:
    return not (isinstance(x, str) and any(0xD800 <= ord(ch) <= 0xDFFF for ch in x))


# --- options and config --------------------------------------------------------------------


CONFIG_FIELDS = ["core_memory_bytes", "working_memory_bytes", "working_memory_entries", "working_memory_ttl",
                 "recall_limit", "text_bytes_max", "evolution_candidates", "evolution_similarity",
                 "hnsw_threshold", "rrf_k", "deep_search_threshold", "embedding_batch_size"]


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), HOSTILE, min_size=1, max_size=3))
def test_fuzz_memory_config(kw: dict[str, Any]) -> None:
    cfg = attempt("MemoryConfig", lambda: umi.MemoryConfig(**kw))
    if cfg is not None:  # accepted: every field is a usable value
        for name in CONFIG_FIELDS:
            v = getattr(cfg, name)
            assert not isinstance(v, bool)
            if name != "working_memory_ttl":
                assert isinstance(v, (int, float)) and math.isfinite(v)
        for name in ("core_memory_bytes", "recall_limit", "rrf_k", "hnsw_threshold", "embedding_batch_size"):
            assert type(getattr(cfg, name)) is int


@FUZZ
@given(st.dictionaries(st.sampled_from(["importance", "metadata", "event_time", "extract_entities"]),
                       st.one_of(HOSTILE, METADATA), min_size=1, max_size=3))
def test_fuzz_remember_options(kw: dict[str, Any]) -> None:
    attempt("RememberOptions", lambda: umi.RememberOptions(**kw))


@FUZZ
@given(st.dictionaries(st.sampled_from(["limit", "entity_types", "time_range", "metadata", "as_of", "deep_search"]),
                       st.one_of(HOSTILE, METADATA, st.tuples(HOSTILE, HOSTILE)), min_size=1, max_size=3))
def test_fuzz_recall_options(kw: dict[str, Any]) -> None:
    attempt("RecallOptions", lambda: umi.RecallOptions(**kw))


@FUZZ
@given(st.dictionaries(st.sampled_from(["entity_types", "time_range", "time_field", "metadata",
                                        "include_superseded", "as_of"]),
                       st.one_of(HOSTILE, METADATA, st.tuples(HOSTILE, HOSTILE)), min_size=1, max_size=3))
def test_fuzz_search_filters(kw: dict[str, Any]) -> None:
    attempt("SearchFilters", lambda: SearchFilters(**kw))


@FUZZ
@given(st.dictionaries(st.sampled_from(["entity_type", "name", "content", "metadata", "importance",
                                        "confidence", "event_time"]),
                       st.one_of(HOSTILE, METADATA), max_size=3))
def test_fuzz_entity(kw: dict[str, Any]) -> None:
    base: dict[str, Any] = {"entity_type": "note", "name": "n", "content": "c"}
    attempt("Entity", lambda: umi.Entity(**{**base, **kw}))


@pytest.mark.filterwarnings("error")  # a numpy cast warning (the old overflow path) fails too
@pytest.mark.parametrize(("embedding", "error"), [
    ("", TypeError), ("abc", TypeError), (b"ab", TypeError), ({1: 2.0}, TypeError), (["x"], TypeError),
    ([True, False], TypeError), ([1 + 2j], TypeError), ([None], TypeError),
    ([10**400], umi.ValidationError), ([float("nan")], umi.ValidationError), ([1.0, float("inf")], umi.ValidationError),
    (np.array([1e39]), umi.ValidationError), ([], umi.ValidationError), ([[1.0]], umi.ValidationError),
    ([1.0, [2.0]], umi.ValidationError), (np.array([np.nan], np.float32), umi.ValidationError),
])
def test_entity_embedding_hostile_values_are_typed(embedding: Any, error: type[Exception]) -> None:
    # Issue 14: Entity(embedding=...) converted with numpy unchecked: "" / ["x"] raised ValueError,
    # [10**400] OverflowError, 1e39 a RuntimeWarning and an inf in the vector.
    try:
        umi.Entity("note", "n", "c", embedding=embedding)
    except error as exc:
        assert "Entity.embedding" in str(exc)
    except Exception as exc:  # noqa: BLE001 - the bug: an untyped or wrongly typed failure
        pytest.fail(f"{type(exc).__name__} instead of {error.__name__}: {exc}")
    else:
        pytest.fail(f"embedding={embedding!r} was accepted")


def test_entity_embedding_numbers_are_stored_as_float32() -> None:
    for value in ([1, 2, 3], (1.5, 2), np.array([1.0, 2.0]), np.arange(4, dtype=np.int64),
                  [-(2**63) - 1, 1]):  # beyond int64 (an object array), its norm under VECTOR_NORM_MAX
        e = umi.Entity("note", "n", "c", embedding=value)
        assert e.embedding is not None and e.embedding.dtype == np.float32 and e.embedding.flags.c_contiguous
        assert np.allclose(e.embedding, np.asarray(value, dtype=np.float64).astype(np.float32))


# --- the arenas ------------------------------------------------------------------------------


def core_state(core: umi.CoreMemory) -> tuple:
    return (core.blocks(), core.used_bytes, core.used_tokens, core.render(), core.render("markdown"))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["set", "get", "remove", "contains", "render", "importance"]),
                          st.one_of(st.sampled_from(["system", "human", "notes"]), HOSTILE),
                          st.one_of(st.text(max_size=30), HOSTILE), HOSTILE), min_size=1, max_size=8))
def test_fuzz_core_memory(ops: list[tuple[str, Any, Any, Any]]) -> None:
    core = umi.CoreMemory(1024, max_tokens=200)
    core.set_block("system", "keep me")
    for op, label, content, extra in ops:
        if op == "set":
            attempt("CoreMemory.set_block", lambda: core.set_block(label, content, extra), lambda: core_state(core))
            attempt("CoreMemory.set_block", lambda: core.set_block(label, content), lambda: core_state(core))
        elif op == "get":
            attempt("CoreMemory.get_block", lambda: core.get_block(label), lambda: core_state(core))
        elif op == "remove":
            attempt("CoreMemory.remove_block", lambda: core.remove_block(label), lambda: core_state(core))
        elif op == "contains":
            attempt("CoreMemory.__contains__", lambda: label in core, lambda: core_state(core))
        elif op == "render":
            attempt("CoreMemory.render", lambda: core.render(label), lambda: core_state(core))
        else:
            attempt("CoreMemory.get_importance", lambda: core.get_importance(label), lambda: core_state(core))
        assert core.used_bytes <= core.max_bytes


@FUZZ
@given(st.dictionaries(st.sampled_from(["max_bytes", "max_tokens", "tokenizer"]), HOSTILE, min_size=1))
def test_fuzz_core_memory_constructor(kw: dict[str, Any]) -> None:
    attempt("CoreMemory()", lambda: umi.CoreMemory(**kw))


@FUZZ
@given(HOSTILE)
def test_fuzz_core_memory_tokenizer_results(n: Any) -> None:
    core = umi.CoreMemory(max_tokens=100, tokenizer=lambda s: n)
    core.set_block("system", "x") if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 100 else None
    attempt("CoreMemory tokenizer", lambda: core.set_block("human", "y"), lambda: core_state(core))
    assert core.used_tokens <= 100


def wm_state(wm: umi.WorkingMemory) -> tuple:
    return (wm.keys(), [wm.get(k) for k in wm.keys()], wm.used_bytes)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["set", "get", "delete", "ttl", "touch", "incr", "contains"]),
                          st.one_of(st.sampled_from(["a", "b"]), HOSTILE), st.one_of(st.binary(max_size=8), HOSTILE),
                          HOSTILE), min_size=1, max_size=8))
def test_fuzz_working_memory(ops: list[tuple[str, Any, Any, Any]]) -> None:
    wm = umi.WorkingMemory(1024, max_entries=4, clock=lambda: 100.0)
    wm.set("a", b"1")
    st_ = lambda: wm_state(wm)  # noqa: E731
    for op, key, value, extra in ops:
        if op == "set":
            attempt("WorkingMemory.set", lambda: wm.set(key, value, extra), st_)
        elif op == "get":
            attempt("WorkingMemory.get", lambda: wm.get(key), st_)
        elif op == "delete":
            attempt("WorkingMemory.delete", lambda: wm.delete(key), st_)
        elif op == "ttl":
            attempt("WorkingMemory.ttl", lambda: wm.ttl(key), st_)
        elif op == "touch":
            attempt("WorkingMemory.touch", lambda: wm.touch(key, extra), st_)
        elif op == "incr":
            attempt("WorkingMemory.incr", lambda: wm.incr(key, extra), st_)
        else:
            attempt("WorkingMemory.__contains__", lambda: key in wm, st_)
        assert wm.used_bytes <= wm.max_bytes


@FUZZ
@given(st.dictionaries(st.sampled_from(["max_bytes", "max_entries", "default_ttl_secs", "on_full", "clock"]),
                       HOSTILE, min_size=1), HOSTILE)
def test_fuzz_working_memory_constructor_and_clock(kw: dict[str, Any], reading: Any) -> None:
    attempt("WorkingMemory()", lambda: umi.WorkingMemory(**kw))
    wm = umi.WorkingMemory(clock=lambda: reading)
    attempt("WorkingMemory clock", lambda: wm.set("k", b"v"))
    attempt("WorkingMemory clock", lambda: wm.get("k"))


# --- Memory ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory():
    m = umi.Memory.sim(seed=5, dim=32)
    m.remember_sync("Alice works at Acme")
    m.remember_sync("Alice left Acme and now works at Initech")
    yield m
    m.close()


def memory_state(m: umi.Memory) -> tuple:
    ents = sorted((e.id, e.valid_to, e.updated_at) for e in m.storage.iter_all())
    return ents, m.storage.generation


@FUZZ
@given(st.one_of(st.text(max_size=60).filter(without_surrogates), HOSTILE.filter(without_surrogates)),
       st.one_of(st.none(), HOSTILE, st.builds(umi.RememberOptions, importance=st.floats(0, 1))))
def test_fuzz_memory_remember(memory: umi.Memory, text: Any, options: Any) -> None:
    attempt("Memory.remember", lambda: memory.remember_sync(text, options))


@FUZZ
@given(st.one_of(HOSTILE.filter(without_surrogates), st.just(""), st.just("   "), st.just("x" * 20_000)),
       st.one_of(st.none(), HOSTILE))
def test_fuzz_memory_rejections_change_nothing(memory: umi.Memory, text: Any, options: Any) -> None:
    # Only inputs that must be refused: the state must be exactly as before.
    if isinstance(text, str) and text.strip() and len(text) < 10_000 and (options is None):
        return
    attempt("Memory.remember (refused)", lambda: memory.remember_sync(text, options), lambda: memory_state(memory))


@FUZZ
@given(st.one_of(st.text(max_size=40).filter(without_surrogates), HOSTILE.filter(without_surrogates)),
       st.one_of(st.none(), HOSTILE, st.builds(umi.RecallOptions, limit=st.integers(1, 100))))
def test_fuzz_memory_recall(memory: umi.Memory, query: Any, options: Any) -> None:
    before = memory_state(memory)
    hits = attempt("Memory.recall", lambda: memory.recall_sync(query, options))
    assert memory_state(memory) == before  # a read never writes
    if hits is not None:
        assert all(h.valid_to is None for h in hits) or (options is not None and getattr(options, "include_superseded", False))


@FUZZ
@given(HOSTILE.filter(without_surrogates))
def test_fuzz_memory_get_forget_history_relations(memory: umi.Memory, entity_id: Any) -> None:
    st_ = lambda: memory_state(memory)  # noqa: E731
    attempt("Memory.get", lambda: memory.get_sync(entity_id), st_)
    attempt("Memory.history", lambda: memory.history_sync(entity_id), st_)
    attempt("Memory.relations", lambda: memory.relations_sync(entity_id), st_)
    if not (isinstance(entity_id, str) and entity_id.strip()):
        attempt("Memory.forget", lambda: memory.forget_sync(entity_id), st_)


@FUZZ
@given(st.dictionaries(st.sampled_from(["config", "llm", "embedder", "storage", "clock"]), HOSTILE, min_size=1))
def test_fuzz_memory_constructor(tmp_path_factory: pytest.TempPathFactory, kw: dict[str, Any]) -> None:
    from umi.providers.sim import SimEmbeddingProvider

    kw.setdefault("embedder", SimEmbeddingProvider(1, 8))
    path = tmp_path_factory.mktemp("ctor") / "m.duckdb"
    m = attempt("Memory()", lambda: umi.Memory(path, **kw))
    if m is not None:
        m.close()


# --- the CLI -------------------------------------------------------------------------------------


CLI_WORDS = st.sampled_from(["remember", "recall", "stats", "import", "export", "--db", "--limit", "--importance",
                             "--json", "--all", "--raw", "--out", "--read-only", "--quiet", "-", "x", "0", "-1",
                             "nan", "inf", "1e400", "\udcff", "", "Alice works at Acme", "--embeddings"])


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(CLI_WORDS, min_size=1, max_size=6))
def test_fuzz_cli_arguments(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
                            argv: list[str]) -> None:
    from umi.cli import main

    d = tmp_path_factory.mktemp("cli")
    argv = [str(d / "db.duckdb") if a == "x" and i and argv[i - 1] == "--db" else a for i, a in enumerate(argv)]
    if "--out" in argv:
        argv = [str(d / "out.jsonl") if i and argv[i - 1] == "--out" else a for i, a in enumerate(argv)]
    if "import" in argv and "-" in argv:
        return  # stdin is pytest's
    COUNTS["cli argv"]["tried"] += 1
    try:
        code = main(argv, out=io.StringIO())
    except SystemExit as exc:  # argparse: usage error, exit 2
        assert exc.code == 2
        COUNTS["cli argv"]["rejected"] += 1
        capsys.readouterr()
        return
    err = capsys.readouterr().err
    assert code in (0, 1, 2), code
    assert "Traceback" not in err
    if code:
        assert len([ln for ln in err.splitlines() if ln.startswith("umi: error: ")]) == 1, err
        COUNTS["cli argv"]["rejected"] += 1
    else:
        COUNTS["cli argv"]["accepted"] += 1


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.text(max_size=30).map(lambda t: '{"text": %s}' % __import__("json").dumps(t)),
                       st.sampled_from(['{"kind": "entity"}', '{"kind": "relation", "source_id": 1}', "[" * 5000,
                                        '{"text": "\\ud800"}', '{"text": 5}', '{"kind": "nope"}', "null", "1e400",
                                        '{"text": "a", "metadata": {"k": [1]}}', '{"text": "b", "event_time": 1.5}',
                                        '"plain text line"']),
                       st.text(max_size=20)), max_size=4).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
))
def test_fuzz_cli_import_files(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
                               content: bytes) -> None:
    from umi.cli import main

    d = tmp_path_factory.mktemp("imp")
    src = d / "in.jsonl"
    src.write_bytes(content)
    COUNTS["cli import file"]["tried"] += 1
    code = main(["import", str(src), "--db", str(d / "db.duckdb"), "--quiet"], out=io.StringIO())
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err
    if code:
        assert len([ln for ln in err.splitlines() if ln.startswith("umi: error: ")]) == 1, err
        assert "internal error" not in err, err
        COUNTS["cli import file"]["rejected"] += 1
    else:
        COUNTS["cli import file"]["accepted"] += 1


def test_zz_report_counts() -> None:
    """Printed with -s; the numbers in the issue-14 report come from here."""
    width = max((len(k) for k in COUNTS), default=10)
    print()
    for k in sorted(COUNTS):
        c = COUNTS[k]
        print(f"  {k:<{width}}  tried {c['tried']:>5}  accepted {c['accepted']:>5}  rejected {c['rejected']:>5}")
    print(f"  total tried {sum(c['tried'] for c in COUNTS.values())}; untyped exceptions: {len(UNTYPED)}")
    assert UNTYPED == []
