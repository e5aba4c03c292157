"""Round 4, adversarial: user stories through the public API that tried to break a lifecycle
promise, a boundary check or the close/reopen rules. Each test pins a bug found this round
(on the embedded DuckDB file in a tmp dir, or on Memory.sim()).
"""

from __future__ import annotations

import errno
import math
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import umi
from umi import RememberOptions

RAW = RememberOptions().without_extraction()


def open_memory(db: Path, **kw: Any) -> umi.Memory:
    return umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1), **kw)


def in_thread(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``fn()`` on a thread, with a deadline: a hang fails the test instead of the run."""
    out: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out.append((False, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout} s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


# --- close() called from umi's own loop (a progress callback) ----------------------------------
def test_close_from_a_progress_callback_is_refused_and_leaves_the_memory_usable_and_closable(
        tmp_path: Path) -> None:
    """A user closes the Memory from remember_many's progress callback (it runs on umi's loop).
    That close is refused; the Memory must stay as it was: the chunk already committed is there,
    later calls work, a later close() really closes, and the file can be opened again. Before the
    fix the refused close had already marked the Memory closed and left its store open, so the file
    stayed locked for the rest of the process (StorageLockedError on every reopen)."""
    db = tmp_path / "cb.duckdb"
    m = open_memory(db)

    def close_now(done: int, total: int) -> None:
        m.close()

    with pytest.raises(umi.LoopReentryError, match="own loop") as caught:
        in_thread(lambda: m.remember_many_sync(["Gus met Hal at the harbour.", "Ida met Jo at the mill."],
                                               RAW, chunk_size=1, progress=close_now))
    assert isinstance(caught.value, umi.UmiError) and isinstance(caught.value, RuntimeError)
    assert in_thread(m.count_sync) == 1  # the first chunk committed before the callback ran
    m.remember_sync("Kim met Lou at the station.", RAW)
    in_thread(m.close)
    with pytest.raises(umi.MemoryClosedError):
        m.count_sync()
    with open_memory(db) as again:  # the store was released
        assert in_thread(again.count_sync) == 2


def test_a_sync_call_from_a_progress_callback_is_a_typed_error_and_loses_nothing(tmp_path: Path) -> None:
    """A user reads the count from remember_many's progress callback with the blocking twin: on
    umi's own loop it would wait for itself. It is refused with LoopReentryError (a UmiError, and a
    RuntimeError as before) naming the async method; the chunk committed before it stays."""
    with open_memory(tmp_path / "cb.duckdb") as m:
        def count_now(done: int, total: int) -> None:
            m.count_sync()

        with pytest.raises(umi.LoopReentryError, match="await the async method"):
            in_thread(lambda: m.remember_many_sync(["Gus met Hal at the harbour.", "Ida met Jo at the mill."],
                                                   RAW, chunk_size=1, progress=count_now))
        assert in_thread(m.count_sync) == 1


def test_export_and_import_file_failures_are_typed_errors_and_import_nothing(tmp_path: Path) -> None:
    """A user exports to a directory by mistake, imports a file that is not there, and one saved
    as Latin-1: each is a umi error (TransferFileError is still an OSError), naming the path;
    nothing is imported."""
    with open_memory(tmp_path / "m.duckdb") as m:
        m.remember_sync("Ana sails in Lisbon.", RAW)
        n = m.count_sync()
        with pytest.raises(umi.TransferFileError, match="cannot write the export") as caught:
            m.export_sync(tmp_path)  # a directory
        assert isinstance(caught.value, OSError) and isinstance(caught.value, umi.UmiError)
        assert caught.value.errno == errno.EISDIR and caught.value.filename == str(tmp_path)
        with pytest.raises(umi.TransferFileError, match="cannot read the import file.*missing.jsonl") as caught:
            m.import_sync(tmp_path / "missing.jsonl")
        assert caught.value.errno == errno.ENOENT
        latin = tmp_path / "latin.jsonl"
        latin.write_bytes('{"text": "Zoë sails."}\n'.encode("latin-1"))
        with pytest.raises(umi.ValidationError, match="not UTF-8"):
            m.import_sync(latin)
        assert m.count_sync() == n


# --- a user clock that gives no usable time --------------------------------------------------------
@pytest.mark.parametrize("reading", [math.nan, math.inf, -math.inf, 1e300, 2**2000],
                         ids=["nan", "inf", "-inf", "1e300", "huge-int"])
def test_a_clock_reading_that_is_no_time_is_a_typed_error_and_stores_nothing(tmp_path: Path,
                                                                            reading: Any) -> None:
    """Memory(clock=...) takes a zero-argument callable returning seconds (as WorkingMemory does).
    A reading that is no time (NaN, inf, beyond the ms range) must fail remember, core writes and
    forget with a umi error naming clock() - not a bare ValueError/OverflowError from int() deep in
    the engine - and leave the store as it was."""
    db = tmp_path / "clock.duckdb"
    now = [1_700_000_000.0]
    with open_memory(db, clock=lambda: now[0]) as m:
        kept = m.remember_sync("Ann keeps bees in Ghent.", RAW).entities[0]
        m.core.set_block("human", "likes honey")
        now[0] = reading
        with pytest.raises(umi.InvalidConfigError, match=r"clock\(\)"):
            m.remember_sync("Bo keeps goats in Lyon.", RAW)
        with pytest.raises(umi.InvalidConfigError, match=r"clock\(\)"):
            m.core.set_block("human", "likes jam")
        with pytest.raises(umi.InvalidConfigError, match=r"clock\(\)"):
            m.forget_sync(kept.id)
        now[0] = 1_700_000_100.0
        assert m.count_sync() == 1 and m.get_sync(kept.id) is not None
        assert m.core.get_block("human") == "likes honey"
        assert [h.content for h in m.recall_sync("Who keeps goats?")] == [kept.content]
    with open_memory(db) as m:
        assert m.count_sync() == 1 and m.core.get_block("human") == "likes honey"


def test_a_clock_returning_no_number_is_a_type_error(tmp_path: Path) -> None:
    with open_memory(tmp_path / "clock.duckdb", clock=lambda: "noon") as m:
        with pytest.raises(TypeError, match=r"clock\(\)"):
            m.remember_sync("Cy keeps cats in Oslo.", RAW)
        with pytest.raises(TypeError, match=r"clock\(\)"):
            m.working.set("k", b"v")  # the same rule WorkingMemory already had


# --- LangGraph store: text that cannot be stored as UTF-8 ----------------------------------------
@pytest.mark.parametrize("where", ["value", "nested value", "key", "namespace label"])
def test_a_langgraph_put_holding_a_lone_surrogate_is_a_validation_error_and_writes_nothing(
        tmp_path: Path, where: str) -> None:
    """An agent's tool output can carry a lone surrogate (a broken emoji cut in half). A put of it
    must be refused with umi's ValidationError (as remember and recall refuse it), before anything
    is written - not a UnicodeEncodeError from deep inside the commit or the id hash - and the
    batch's other puts must not land either."""
    pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
    from langgraph.store.base import PutOp

    from umi.integrations.langgraph import UmiStore

    bad = "broken \ud83d emoji"
    ns, key, value = ("memories", "alice"), "note", {"text": "Alice likes tea"}
    if where == "value":
        value = {"text": bad}
    elif where == "nested value":
        value = {"text": "fine", "more": {"deep": [bad]}}
    elif where == "key":
        key = bad
    else:
        ns = ("memories", "alice", bad)
    with open_memory(tmp_path / "lg.duckdb") as m:
        store = UmiStore(m, user_level=1)
        store.put(("memories", "alice"), "kept", {"text": "Alice keeps bees"})
        with pytest.raises(umi.ValidationError, match="surrogate"):
            store.batch([PutOp(("memories", "alice"), "other", {"text": "Alice likes jam"}),
                         PutOp(ns, key, value)])
        assert [i.key for i in store.search(("memories", "alice"))] == ["kept"]
        assert m.count_sync() == 1


def test_a_langgraph_get_or_delete_of_a_key_holding_a_lone_surrogate_is_a_validation_error(tmp_path: Path) -> None:
    pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
    from umi.integrations.langgraph import UmiStore

    with open_memory(tmp_path / "lg.duckdb") as m:
        store = UmiStore(m, user_level=1)
        store.put(("memories", "alice"), "kept", {"text": "Alice keeps bees"})
        for call in (lambda: store.get(("memories", "alice"), "k\udc00"),
                     lambda: store.delete(("memories", "alice"), "k\udc00")):
            with pytest.raises(umi.ValidationError, match="store key .* surrogate"):
                call()
        assert store.get(("memories", "alice"), "kept") is not None


# --- export / import: the wrong kind of destination or source -------------------------------------
@pytest.mark.parametrize("out", [None, 5, ["a list"]], ids=["None", "int", "list"])
def test_export_to_something_that_is_no_path_or_text_file_is_a_type_error(tmp_path: Path, out: Any) -> None:
    """export(out) takes a path or a text file; anything else is a wrong type (TypeError naming
    what it takes), as every other verb's wrong types are - not an AttributeError from writelines."""
    with open_memory(tmp_path / "x.duckdb") as m:
        m.remember_sync("Pia keeps owls in Bergen.", RAW)
        with pytest.raises(TypeError, match="path or a text file"):
            m.export_sync(out)


@pytest.mark.parametrize("src", [b'{"text": "Rui keeps hens in Braga."}\n',
                                 bytearray(b'{"text": "Rui keeps hens in Braga."}\n'), 5],
                         ids=["bytes", "bytearray", "int"])
def test_import_of_bytes_or_a_non_iterable_is_a_type_error_and_stores_nothing(tmp_path: Path, src: Any) -> None:
    """import_(src) takes a path or an iterable of JSONL lines (str). Bytes iterate as ints: that
    was an AttributeError ('int' object has no attribute 'strip') from the line parser."""
    with open_memory(tmp_path / "x.duckdb") as m:
        with pytest.raises(TypeError, match="path or .*lines"):
            m.import_sync(src)
        assert m.count_sync() == 0


# --- RememberOptions' switches ----------------------------------------------------------------
@pytest.mark.parametrize("field", ["extract_entities", "generate_embeddings", "detect_evolutions"])
@pytest.mark.parametrize("value", ["no", 0, None], ids=["str-no", "int-0", "None"])
def test_remember_options_switches_take_only_bools(field: str, value: Any) -> None:
    """RememberOptions(detect_evolutions="no") was accepted, and "no" is truthy: the user who asked
    for no evolution detection silently got it (their old facts superseded). The switches are bools,
    as RecallOptions' switches (use_vector_search, deep_search, ...) already are: TypeError."""
    with pytest.raises(TypeError, match=f"{field} must be a bool"):
        RememberOptions(**{field: value})


def test_a_truthy_string_never_turns_evolution_detection_on() -> None:
    """The story behind the check: with detect_evolutions given as "false" (a config file's string)
    the new fact would have superseded the old one."""
    with umi.Memory.sim(seed=1) as m:
        m.remember_sync("Ola works at Acme Corp.")
        with pytest.raises(TypeError):
            m.remember_sync("Ola left Acme Corp and now works at Initech.",
                            RememberOptions(detect_evolutions="false"))  # type: ignore[arg-type]
        assert m.count_sync(include_superseded=False) == m.count_sync()  # nothing was superseded


# --- an empty database path ----------------------------------------------------------------------
def test_memory_with_an_empty_path_is_refused_not_silently_in_memory(tmp_path: Path, monkeypatch: Any) -> None:
    """Memory(os.environ.get("UMI_DB", "")) opened an in-memory DuckDB: every remember was
    acknowledged, and everything was gone at close - the durability promise broken without a word.
    An empty path is refused; an in-memory store is asked for by name (":memory:")."""
    monkeypatch.chdir(tmp_path)
    path = ""
    with pytest.raises(umi.ValidationError, match=":memory:"):
        open_memory(path)  # type: ignore[arg-type]
    with pytest.raises(umi.ValidationError, match=":memory:"):
        umi.MemoryBuilder().with_embedder(umi.SimEmbeddingProvider(seed=1)).with_path(path).build()
    with open_memory(":memory:") as m:  # asked for by name: still an in-memory store
        m.remember_sync("Tess met Uma at the market.", RAW)
        assert m.count_sync() == 1


# --- names with letters beyond ASCII (rule extraction, the embedded default) ------------------------
def _names(result: umi.RememberResult) -> set[str]:
    return {e.name for e in result.entities}


def test_names_with_accents_are_whole_names_and_two_people_are_not_merged(tmp_path: Path) -> None:
    """The rule extractor read a name as its ASCII prefix: "René" and "Renée" were both "Ren" (one
    person, their facts linked as the same person's), "Müller" was "M", "Jürgen met Ana in Zürich"
    named "J" and "Z", and "Émile"/"Łukasz" were no name at all. Names are whole, in any script
    that has capitals; a person is found by their real name."""
    with open_memory(tmp_path / "names.duckdb") as m:
        rene = m.remember_sync("René lives in Paris.")
        renee = m.remember_sync("Renée lives in Lyon.")
        assert "René" in _names(rene) and "Renée" in _names(renee)
        assert not renee.evolutions  # two people: nothing of René's is touched by Renée's news
        assert _names(m.remember_sync("Müller works at Initech.")) >= {"Müller", "Initech"}
        assert _names(m.remember_sync("Jürgen met Ana in Zürich.")) >= {"Jürgen", "Ana", "Zürich"}
        assert "Émile" in _names(m.remember_sync("Émile works at Acme Corp."))
        assert "Łukasz" in _names(m.remember_sync("Łukasz works at Globex."))
        assert "Søren" in _names(m.remember_sync("Søren lives in Oslo. Ólafur moved to Reykjavík."))
        hits = m.recall_sync("Where does René live?", umi.RecallOptions(limit=1))
        assert [h.content for h in hits] == ["René lives in Paris."]


def test_a_sentence_opening_with_an_accented_capital_is_its_own_sentence() -> None:
    """"Bob lives in Rome. Émile works at Acme." is two sentences (the split looked for A-Z only),
    so Émile's fact is not filed under Bob."""
    with umi.Memory.sim(seed=1) as m:
        r = m.remember_sync("Bob lives in Rome. Émile works at Acme Corp.", RememberOptions())
        by_name = {e.name: e.content for e in r.entities}
        assert by_name.get("Bob") == "Bob lives in Rome."
        assert by_name.get("Émile") == "Émile works at Acme Corp."


def test_a_decomposed_accent_stays_part_of_the_name() -> None:
    """The same name typed with a combining accent (NFD, as macOS file names and some keyboards
    give it) is the whole name, not the letters before the accent."""
    import unicodedata

    with umi.Memory.sim(seed=1) as m:
        nfd = unicodedata.normalize("NFD", "José works at Acme Corp.")
        assert unicodedata.normalize("NFD", "José") in _names(m.remember_sync(nfd))


def test_a_speaker_label_with_an_accent_names_the_speaker() -> None:
    with umi.Memory.sim(seed=1) as m:
        r = m.remember_sync("Zoë: I moved to Berlin last month.")
        assert "Zoë" in _names(r)


# --- forget, and the database file's bytes ------------------------------------------------------
def test_forgotten_text_is_not_left_in_the_database_file(tmp_path: Path) -> None:
    """Forget forgets: "removes the content everywhere". A user forgets a secret, closes, and a
    `strings m.duckdb` still showed it: DuckDB keeps a deleted row's bytes in its row group (a
    delete mask) and in freed blocks. Erasure is forget, then compact (which rewrites the file)."""
    db = tmp_path / "m.duckdb"
    secret = b"xylophonic7731"
    with open_memory(db) as m:
        m.remember_many_sync([f"Filler note {i} about gardening and topic{i}." for i in range(300)], RAW)
        fact = m.remember_sync("The vault code is xylophonic7731, said Ada.", RAW).entities[0]
    with open_memory(db) as m:
        assert m.forget_sync(fact.id)
        assert all("xylophonic7731" not in h.content for h in m.recall_sync("xylophonic7731"))
        assert any(secret in f.read_bytes() for f in tmp_path.iterdir())  # forget alone: still on disk
        assert m.compact_sync() is True
    for f in tmp_path.iterdir():
        assert secret not in f.read_bytes(), f"{f.name} still holds the forgotten text"


# --- importing an older export over a store that moved on -----------------------------------------
def test_importing_an_older_export_over_newer_facts_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """A user exports (a backup), corrects a fact (update), then imports the backup again. The
    import overwrote the corrected fact's row with its old, current state while its history still
    ended in 'supersede' and the 'update' relation still retired it: two current answers to one
    question and a store that contradicts itself. An import that would overwrite a stored fact with
    another state is refused (all-or-nothing: nothing written); an unchanged one stays idempotent."""
    import io

    with open_memory(tmp_path / "m.duckdb") as m:
        old = m.remember_sync("Alice works at Acme Corp.").entities[0]
        backup = io.StringIO()
        m.export_sync(backup)
        assert m.import_sync(io.StringIO(backup.getvalue()))["entities"] >= 1  # same state: idempotent
        new = m.update_sync(old.id, "Alice works at Initech.").entities[0]
        before = io.StringIO()
        m.export_sync(before)
        with pytest.raises(umi.ValidationError, match="is stored in another state"):
            m.import_sync(io.StringIO(backup.getvalue()))
        after = io.StringIO()
        m.export_sync(after)
        assert after.getvalue() == before.getvalue()
        assert [h.content for h in m.recall_sync("Where does Alice work?")] == [new.content]
        assert m.get_sync(old.id).valid_to is not None


# --- the MCP server: a JSON boolean is no time -----------------------------------------------------
@pytest.mark.parametrize("field,tool,args", [
    ("event_time", "remember", {"text": "Wes keeps bees in Turku."}),
    ("as_of", "recall", {"query": "Who keeps bees?"}),
    ("time_start", "recall", {"query": "Who keeps bees?"}),
])
async def test_an_mcp_time_given_as_true_is_refused_not_read_as_one_millisecond(field: str, tool: str,
                                                                               args: dict[str, Any]) -> None:
    """A client that sends {"event_time": true} got a fact dated 1970-01-01T00:00:00.001 (the JSON
    boolean coerced to the int 1). A time is an ISO-8601 string or integer milliseconds."""
    pytest.importorskip("mcp", reason="the mcp extra is not installed")
    from mcp import Client

    from umi.integrations.mcp_server import build_server

    with umi.Memory.sim(seed=1) as m:
        async with Client(build_server(m)) as client:
            result = await client.call_tool(tool, {**args, field: True})
            assert result.is_error
            assert m.count_sync() == 0


def test_every_langgraph_store_call_after_its_memory_closed_is_memory_closed(tmp_path: Path) -> None:
    """After the Memory closes, put said MemoryClosedError but get/search/list_namespaces reached
    the closed store and said StorageError("this DuckDB store is closed"): one error for one cause."""
    pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
    from umi.integrations.langgraph import UmiStore

    m = open_memory(tmp_path / "lg.duckdb")
    store = UmiStore(m, user_level=1)
    store.put(("memories", "alice"), "kept", {"text": "Alice keeps bees"})
    m.close()
    for call in (lambda: store.get(("memories", "alice"), "kept"),
                 lambda: store.search(("memories", "alice")),
                 lambda: store.search(("memories", "alice"), query="bees"),
                 lambda: store.list_namespaces(),
                 lambda: store.put(("memories", "alice"), "new", {"text": "x"})):
        with pytest.raises(umi.MemoryClosedError):
            call()
