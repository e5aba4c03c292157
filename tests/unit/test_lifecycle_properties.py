"""Hypothesis properties of the memory lifecycle, against a plain model of what was told.

* Nothing told is lost: after ``remember`` of a random multi-sentence text, every sentence's
  distinctive words find it through ``recall``.
* Forget forgets: after ``forget_source`` (or forgetting every recalled statement), nothing of
  the text is found by recall, history, export, or — on a DuckDB file — a scan of every text
  column of every table through DuckDB itself; another text told alongside is untouched.
* History holds: remember → supersede → restate, in any order; ``as_of`` each step's instant
  answers what the model says was current then.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi import RecallOptions
from umi.providers.sim import SimEmbeddingProvider
from umi.sim.clock import SimClock
from umi.storage.sim import SimStorageBackend

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Esther", "Farid"]
VERBS = ["keeps", "studies", "mentioned", "likes", "wants", "found"]
STARTS = ["Budget", "Weather", "Meeting", "Honestly", "Planning"]

word = st.text(alphabet="bcdfgklmnprstvz", min_size=3, max_size=4).map(lambda s: "q" + s + "ix")


@st.composite
def sentences(draw):
    """(sentence, its distinctive words) — three forms: about a name, a common capitalised start,
    or no capital at all (only a note can keep those)."""
    w1, w2 = draw(word), draw(word)
    form = draw(st.integers(0, 2))
    if form == 0:
        s = f"{draw(st.sampled_from(NAMES))} {draw(st.sampled_from(VERBS))} {w1} and {w2}."
    elif form == 1:
        s = f"{draw(st.sampled_from(STARTS))} is {w1} with {w2}."
    else:
        s = f"we {draw(st.sampled_from(VERBS))} the {w1} near {w2}"
    return s, (w1, w2)


@st.composite
def texts(draw):
    parts = draw(st.lists(sentences(), min_size=1, max_size=5))
    words = [w for _, ws in parts for w in ws]
    if len(set(words)) != len(words):  # distinctive means distinctive
        parts = parts[:1]
    sep = draw(st.sampled_from([" ", "\n"]))
    return sep.join(s if s.endswith(".") or sep == "\n" else s + "." for s, _ in parts), [ws for _, ws in parts]


def sim_memory():
    return umi.Memory(storage=SimStorageBackend(seed=5), llm=None,
                                  embedder=SimEmbeddingProvider(5, 64), clock=SimClock(start_ms=1_700_000_000_000))


def found(m, w1, w2):
    return [h for h in m.recall_sync(f"{w1} {w2}", RecallOptions(limit=10)) if w1 in h.content and w2 in h.content]


def export_text(m):
    buf = io.StringIO()
    m.export_sync(buf)
    return buf.getvalue()


def scan_duckdb(path, words):
    """Every text column of every table of the file, searched by DuckDB for each word."""
    con = duckdb.connect(path, read_only=True)
    try:
        cols = con.execute(
            "SELECT table_schema, table_name, column_name FROM information_schema.columns "
            "WHERE data_type IN ('VARCHAR', 'JSON') OR data_type LIKE 'VARCHAR%'").fetchall()
        hits = []
        for schema, table, col in cols:
            for w in words:
                n = con.execute(f'SELECT count(*) FROM "{schema}"."{table}" WHERE CAST("{col}" AS VARCHAR) ILIKE ?',
                                [f"%{w}%"]).fetchone()[0]
                if n:
                    hits.append((table, col, w))
        return hits, len(cols)
    finally:
        con.close()


def check_told_then_forgotten(m, text, parts, by_source, bystander, path=None):
    other = m.remember_sync(bystander)
    r = m.remember_sync(text)
    assert not r.duplicate
    for w1, w2 in parts:  # nothing told is lost
        assert found(m, w1, w2), (text, w1, w2, r.entities)
    words = [w for ws in parts for w in ws]
    if path is not None:
        m.close()
        hits, ncols = scan_duckdb(path, words[:1])
        assert hits and ncols > 3  # the scan sees the text while it is stored
        m = umi.Memory(path, embedder=SimEmbeddingProvider(5, 64), clock=SimClock(start_ms=1_800_000_000_000))
    if by_source:
        assert m.forget_source_sync(r.source_id) == len(r.entities)
    else:
        for w1, w2 in parts:
            for h in found(m, w1, w2):
                m.forget_sync(h.id)
    for w1, w2 in parts:
        assert not found(m, w1, w2)
        assert not [h for h in m.recall_sync(w1, RecallOptions(limit=100, include_superseded=True)) if w1 in h.content]
    for e in r.entities:
        assert m.get_sync(e.id) is None
        assert all(set(h.snapshot) <= {"id", "forgotten"} for h in m.history_sync(e.id))
    dump = export_text(m)
    assert not any(w in dump for w in words)
    assert "qbystanderix" in dump and found(m, "qbystanderix", "qwitnessix")  # only the text was forgotten
    assert m.count_sync() == len(other.entities)
    again = m.remember_sync(text)  # and it can be told again
    assert not again.duplicate and all(found(m, w1, w2) for w1, w2 in parts)
    if path is not None:
        m.forget_source_sync(again.source_id)
        m.close()
        hits, _ = scan_duckdb(path, words)
        assert hits == []
        return None
    return m


BYSTANDER = "Gus keeps qbystanderix and qwitnessix."


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts(), st.booleans())
def test_every_sentence_is_found_and_forget_leaves_nothing(told, by_source):
    text, parts = told
    m = sim_memory()
    try:
        m = check_told_then_forgotten(m, text, parts, by_source, BYSTANDER)
    finally:
        if m is not None:
            m.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts(), st.booleans())
def test_forget_leaves_nothing_in_any_duckdb_table(told, by_source):
    text, parts = told
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prop.duckdb")
        m = umi.Memory(path, embedder=SimEmbeddingProvider(5, 64), clock=SimClock(start_ms=1_700_000_000_000))
        try:
            m = check_told_then_forgotten(m, text, parts, by_source, BYSTANDER, path)
        finally:
            if m is not None:
                m.close()


ORGS = ["Acme Corp", "Initech", "Globex", "Hooli"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(ORGS) - 1), min_size=1, max_size=8))
def test_as_of_every_step_answers_what_was_current_then(steps):
    """The model: telling "Alice now works at X." makes it Alice's one current job, whether it is
    new (it updates the current one) or a restatement (revived; what replaced it is retired)."""
    m = sim_memory()
    try:
        instants, expected = [], []
        for i in steps:
            m.remember_sync(f"Alice now works at {ORGS[i]}.")
            instants.append(m._engine.now_ms())
            expected.append(f"Alice now works at {ORGS[i]}.")

        def jobs(opts):
            return {h.content for h in m.recall_sync("Alice now works at", opts) if h.content.startswith("Alice")}

        assert jobs(RecallOptions(limit=10)) == {expected[-1]}
        for t, want in zip(instants, expected):
            assert jobs(RecallOptions(limit=10, as_of=t)) == {want}, (steps, t)
        everything = jobs(RecallOptions(limit=10, include_superseded=True))
        assert everything == {f"Alice now works at {ORGS[i]}." for i in set(steps)}
    finally:
        m.close()

