"""The umi command on the embedded default (DuckDB file, local embedder, rule extraction)."""

import io
import json
import subprocess
import sys

import pytest

from umi.cli import main


def run(*argv):
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "cli.duckdb")


def test_remember_recall_stats_round_trip(db):
    code, out = run("remember", "Alice works at Acme Corp", "--db", db)
    assert code == 0 and out.startswith("stored 2 entities, 0 evolutions")
    code, out = run("remember", "Alice left Acme Corp and now works at Initech", "--db", db)
    assert code == 0 and "update:" in out
    code, out = run("recall", "Where does Alice work?", "--db", db, "--limit", "3", "--json")
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and 1 <= len(hits) <= 3
    assert "Alice works at Acme Corp" not in [h["content"] for h in hits]
    assert any("Initech" in h["content"] for h in hits)
    code, out = run("stats", "--db", db)
    assert code == 0 and "entities: 5 (current 3, superseded 2)" in out


def test_export_then_import_restores_entities_and_relations(db, tmp_path):
    run("remember", "Bob lives in Berlin", "--db", db)
    run("remember", "Bob moved to Munich", "--db", db)
    dump = tmp_path / "dump.jsonl"
    assert run("export", "--db", db, "--out", str(dump), "--embeddings")[0] == 0
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    kinds = [x["kind"] for x in lines]
    assert kinds.count("relation") >= 1 and kinds.index("relation") > kinds.index("entity")
    other = str(tmp_path / "other.duckdb")
    code, out = run("import", str(dump), "--db", other, "--quiet")
    assert code == 0 and f"entities={kinds.count('entity')}" in out and f"relations={kinds.count('relation')}" in out
    again = tmp_path / "again.jsonl"
    run("export", "--db", other, "--out", str(again), "--embeddings")
    assert again.read_text() == dump.read_text()


def test_import_texts_with_progress_and_errors(db, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Carol plays chess", "metadata": {"day": 1}}\n"Dan sings opera"\n\n"Dan sings opera"\n')
    code, out = run("import", str(src), "--db", db)
    assert code == 0 and "remembered=2 duplicates=1" in out
    assert "3/3" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    code, _ = run("import", str(bad), "--db", db, "--quiet")
    assert code == 2 and "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_errors_are_reported_with_exit_code_2(db, capsys):
    code, _ = run("recall", "   ", "--db", db)
    assert code == 2 and "empty" in capsys.readouterr().err
    code, _ = run("recall", "x", "--limit", "0", "--db", db)
    assert code == 2 and "between 1 and 100" in capsys.readouterr().err


def test_demo_runs_as_a_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "umi.cli", "demo"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "<core_memory>" in out and "&lt;distributed systems&gt; &amp; databases" in out
    assert "otp=None" in out and "session_id=b'abc123'" in out
    assert "update of [Alice] 'Alice is a software engineer at Acme Corp.' by [Alice]" in out
    assert "Carol manages the Apollo project at Acme Corp." in out.split("recall:")[0]
    assert "[superseded]" in out
