"""Which older facts a change retires, told as group chats on the embedded default (rule
extraction, no LLM). bench_quality on a fresh dev seed found the update that never happened
because the old fact was not among the candidates ("I relocated to Gdansk" vs "My flat is in
Seville": far apart as vectors, and a talkative speaker has nearer facts), and the facts a change
must not retire: a visited flat, a job interview, a relative's job, the job market — one of them,
restated later, came back and retired the real news."""

from __future__ import annotations

import pytest
from rule_memory import rules_memory

import umi
from umi import RecallOptions
from umi.pipeline.evolution import Candidate, related, rule_classify


@pytest.fixture
def chat():
    m = rules_memory(5)
    yield m
    m.close()


def chatter(m: umi.Memory, speaker: str, n: int) -> None:
    """A talkative speaker: ``n`` facts under their name, none about home or work."""
    topics = ["cat", "bouldering", "pasta", "jazz", "chess", "tea", "rain", "podcast", "garden", "bike"]
    for i in range(n):
        m.remember_sync(f"{speaker}: I keep thinking about {topics[i % len(topics)]} number {i}.")
        m.clock.advance(60_000)


def test_a_move_retires_the_old_home_past_nearer_chatter(chat):
    home = chat.remember_sync("Theo: My flat is in Seville, right by the river.")
    old = {e.id for e in home.entities if e.name == "Theo"}
    chatter(chat, "Theo", 12)  # more facts under Theo than evolution_candidates (5)
    res = chat.remember_sync("Theo: I relocated to Gdansk last week, still finding my way around.")
    retired = {r.source_id for r in res.evolutions if r.evolution_type.supersedes}
    assert old and old <= retired
    hits = chat.recall_sync("Where does Theo live now?", RecallOptions(limit=20))
    assert not any("Seville" in h.content for h in hits)
    assert any("Gdansk" in h.content for h in hits)


def test_a_job_switch_retires_the_old_job_held_as_an_occupation(chat):
    chat.remember_sync("Ivan: Still at Quillon Press, doing my thing as an editor.")
    chatter(chat, "Ivan", 8)
    res = chat.remember_sync("Ivan: I switched jobs, I'm now a route planner at Northwind Logistics.")
    retired = {chat.storage.get(r.source_id).content for r in res.evolutions if r.evolution_type.supersedes}
    assert "Ivan: Still at Quillon Press, doing my thing as an editor." in retired


@pytest.mark.parametrize("old", [
    "Theo: So I viewed a flat in Graz last Sunday.",               # a flat seen, not a home held
    "Theo: Oh, and I had a job interview at Tidewater Museum last weekend.",  # not a job held
    "Theo: The new job market is wild, everyone I know is interviewing.",
    "Theo: My cousin works at a hospital, the shifts sound brutal.",  # the cousin's job
    "Theo: Rosa got a job as a firefighter, we're all so proud.",     # Rosa's job
    "Theo: I sat in the dentist's chair for an hour this morning.",   # an occupation met
    "Theo: So I ran the Bristol half marathon this morning.",         # "so", "this morning": no topic
])
def test_news_does_not_retire_what_it_is_not_about(old):
    for new in ("Theo: I relocated to Gdansk last week, still finding my way around.",
                "Theo: First week at Asterisk Robotics done, being a firmware engineer there is so different.",
                "Theo: I switched jobs, I'm now a route planner at Northwind Logistics."):
        got = rule_classify(Candidate("n", "Theo", "person", new), [Candidate("o", "Theo", "person", old)])
        assert [d.evolution_type.supersedes for d in got] == [False], (new, old)


@pytest.mark.parametrize("new,old,want", [
    ("Theo: I relocated to Gdansk.", "Theo: My flat is in Seville, right by the river.", True),
    ("Theo: I relocated to Gdansk.", "Theo: I'm based in Porto.", True),
    ("Theo: I relocated to Gdansk.", "Theo: So I viewed a flat in Graz last Sunday.", False),
    ("Ivan: I switched jobs.", "Ivan: Still at Quillon Press as an editor.", True),
    ("Ivan: I switched jobs.", "Ivan: I had a job interview at the museum.", False),
    ("Ivan: I switched jobs.", "Ivan: I saw a lawyer about the lease.", False),
])
def test_related_table(new, old, want):
    name = new.split(":")[0]
    assert related(Candidate("n", name, "person", new), Candidate("o", name, "person", old)) is want


def test_restated_small_talk_does_not_bring_back_the_old_job(chat):
    """The story that lost Ivan's new job: the job market line was retired by the switch, said
    again, came back as current and retired the switch. It must never be retired at all."""
    chat.remember_sync("Ivan: Still at Quillon Press, doing my thing as an editor.")
    chat.remember_sync("Ivan: The new job market is wild, everyone I know is interviewing.")
    chat.clock.advance(86_400_000)
    chat.remember_sync("Ivan: I switched jobs, I'm now a route planner at Northwind Logistics.")
    chat.clock.advance(86_400_000)
    chat.remember_sync("Ivan: The new job market is wild, everyone I know is interviewing.")
    now = {e.content for e in chat.storage.find_by_name("Ivan") if e.valid_to is None}
    assert "Ivan: I switched jobs, I'm now a route planner at Northwind Logistics." in now
    assert "Ivan: Still at Quillon Press, doing my thing as an editor." not in now
    hits = chat.recall_sync("Who is Ivan's current employer?", RecallOptions(limit=10))
    assert any("Northwind" in h.content for h in hits)
    assert not any("Quillon" in h.content for h in hits)
