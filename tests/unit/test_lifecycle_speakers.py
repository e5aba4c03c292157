"""Group chats on the embedded default (rule extraction, no LLM): each "Name: I …" turn is a fact
about its speaker, one speaker's news never retires another's, and recall without an LLM does not
run rule rewrites unless asked (bench_quality found both cost the default path recall)."""

from __future__ import annotations

import pytest
from rule_memory import rules_memory

import umi
import umi.pipeline.recall as recall_mod
from umi import EntityType, EvolutionType, RecallOptions
from umi.pipeline.extraction import rule_extract, speaker_of
from umi.pipeline.retrieval import RULE_REWRITE_WEIGHT, rrf_fuse


@pytest.fixture
def rules():
    m = rules_memory(3)
    yield m
    m.close()


def current(m, text):
    """The current facts whose content is ``text``."""
    return [e for e in m.recall_sync(text, RecallOptions(limit=50, include_superseded=True))
            if e.content == text and e.valid_to is None]


def test_a_speaker_label_names_the_first_person_of_its_line():
    got = rule_extract("Bob: I work at Acme. My dog is Rex.\nI live in Oslo.")
    by_content = {}
    for f in got:
        by_content.setdefault(f.content, []).append((f.name, f.entity_type))
    assert ("Bob", EntityType.PERSON) in by_content["Bob: I work at Acme."]
    assert ("Bob", EntityType.PERSON) in by_content["My dog is Rex."]  # same line, same speaker
    assert ("User", EntityType.SELF) in by_content["I live in Oslo."]  # no label: the user
    assert not any(n == "User" for n, _ in by_content["Bob: I work at Acme."])


@pytest.mark.parametrize("line,speaker", [
    ("Bob: I work at Acme", "Bob"),
    ("Mary Ann: I moved", "Mary Ann"),
    ("I: am here", None),           # a pronoun is no speaker
    ("The plan: ship it", None),    # function word
    ("Budget: five million", None),  # common English, never written as a name mid-sentence
    ("at 10:30 we met", None),
])
def test_speaker_label_table(line, speaker):
    assert speaker_of(line) == speaker


def test_bobs_job_does_not_supersede_alices(rules):
    rules.remember_sync("Alice: I work at Initech.")
    res = rules.remember_sync("Bob: I now work at Acme.")  # "now" is an update cue
    assert not [r for r in res.evolutions if r.evolution_type.supersedes]
    assert current(rules, "Alice: I work at Initech.")
    top = rules.recall_sync("Where does Bob work?", RecallOptions(limit=3))
    assert top[0].content == "Bob: I now work at Acme."
    assert "Bob" in top[0].mentions
    alice = rules.recall_sync("Where does Alice work?", RecallOptions(limit=3))
    assert alice[0].content == "Alice: I work at Initech."
    # Alice's own news does retire her old job, and only hers.
    res = rules.remember_sync("Alice: I now work at Globex.")
    retired = {r.source_id for r in res.evolutions if r.evolution_type is EvolutionType.UPDATE}
    assert retired
    assert not current(rules, "Alice: I work at Initech.")
    assert current(rules, "Bob: I now work at Acme.")
    assert rules.recall_sync("Where does Alice work?", RecallOptions(limit=1))[0].content == \
        "Alice: I now work at Globex."


def test_mentioning_someone_in_a_first_person_turn_does_not_update_them(rules):
    rules.remember_sync("Alice: I live in Glasgow.")
    rules.remember_sync("Bob: I work at Acme.")
    res = rules.remember_sync("Bob: I told Alice I moved to Leeds.")
    assert not [r for r in res.evolutions if r.evolution_type.supersedes]
    assert current(rules, "Alice: I live in Glasgow.")
    assert current(rules, "Bob: I work at Acme.")  # "I" alone does not make two facts related


def test_unlabelled_first_person_facts_still_evolve(rules):
    rules.remember_sync("I work at Initech.")
    res = rules.remember_sync("I now work at Acme.")
    assert [r for r in res.evolutions if r.evolution_type is EvolutionType.UPDATE]
    assert not current(rules, "I work at Initech.")


# --- (b) the deep path without an LLM ---------------------------------------------------------


@pytest.fixture
def rewrites(monkeypatch):
    calls = []
    real = recall_mod.rule_rewrite

    def counting(query):
        calls.append(query)
        return real(query)

    monkeypatch.setattr(recall_mod, "rule_rewrite", counting)
    return calls


def test_no_llm_recall_runs_no_rewrites_unless_asked(rules, rewrites):
    rules.remember_sync("Alice: I work at Initech.")
    # a question answered weakly (fewer results than asked for): the automatic rule's case
    hits = rules.recall_sync("Who works at Initech?", RecallOptions(limit=10))
    assert hits and rewrites == []
    deep = rules.recall_sync("Who works at Initech?", RecallOptions(limit=10, deep_search=True))
    assert rewrites == ["Who works at Initech?"]
    assert deep[0].content == "Alice: I work at Initech."


def test_with_an_llm_the_automatic_deep_rule_still_fires(monkeypatch):
    from umi.pipeline.context import PipelineContext

    asked = []
    orig = PipelineContext.ask

    async def spy(self, kind, *a, **kw):
        asked.append(kind)
        return await orig(self, kind, *a, **kw)

    monkeypatch.setattr(PipelineContext, "ask", spy)
    with umi.Memory.sim(seed=7) as m:
        m.remember_sync("Alice works at Initech.")
        asked.clear()
        m.recall_sync("Who works at Initech?", RecallOptions(limit=10))
    assert asked == ["rewrite_query"]


def test_rrf_weights_scale_each_list():
    assert rrf_fuse([["a"], ["b"]], k=60, weights=[1.0, RULE_REWRITE_WEIGHT]) == \
        [("a", 1 / 61), ("b", RULE_REWRITE_WEIGHT / 61)]
    # a rewrite list agreeing with the query outranks; two rewrite lists do not outvote one query list
    fused = dict(rrf_fuse([["q"], ["r"], ["r"]], k=60, weights=[1.0, RULE_REWRITE_WEIGHT, RULE_REWRITE_WEIGHT]))
    assert fused["q"] > fused["r"]
    assert rrf_fuse([["a", "b"]], k=60) == rrf_fuse([["a", "b"]], k=60, weights=[1.0])


def test_asking_about_a_speaker_finds_their_fact_not_their_latest_small_talk(rules):
    # Bob tells where he lives, then chats on; friends ask him things. The question names Bob:
    # the name prefers Bob's facts, but which of them is the question's business — and a question
    # put to Bob ("Bob, where do you live now?") tells nothing about him.
    rules.remember_sync("Bob: I live in Leeds, near the old docks.")
    for line in ["Bob: Good for you.", "Bob: Makes sense.", "Alice: Bob, how was your week?",
                 "Bob: Going to the gym after this.", "Carol: Bob, do you live near the station?",
                 "Bob: Ha, typical.", "Bob: Love that."]:
        rules.remember_sync(line)
    top = rules.recall_sync("Where does Bob live?", RecallOptions(limit=3).fast_only())
    assert top[0].content == "Bob: I live in Leeds, near the old docks."


# --- what retires a fact in a chat (issue 12: knowledge updates) -------------------------------


def chatter(m, speaker, n):
    """``n`` lines of small talk by ``speaker``, each different (none says anything about work)."""
    for i in range(n):
        m.remember_sync(f"{speaker}: Ha, that film was good number {i}.")


def test_a_job_change_retires_the_old_job_even_after_a_lot_of_chatter(rules):
    # Tom says where he works, chats for a while, then changes jobs. The old job fact is far back
    # among Tom's facts; the change must still find it and retire it.
    rules.remember_sync("Tom: I work at Harbor Bank as a risk analyst.")
    chatter(rules, "Tom", 12)
    res = rules.remember_sync("Tom: I handed in my notice at Harbor Bank; from Monday I'm a firmware engineer "
                              "with Asterisk Robotics.")
    assert [r for r in res.evolutions if r.evolution_type.supersedes]
    assert not current(rules, "Tom: I work at Harbor Bank as a risk analyst.")
    top = rules.recall_sync("Harbor Bank", RecallOptions(limit=3))
    assert "Asterisk Robotics" in top[0].content  # asking about the old job shows the change
    assert all(e.content != "Tom: I work at Harbor Bank as a risk analyst." for e in top)
    # history keeps the old job
    old = rules.recall_sync("Harbor Bank risk analyst", RecallOptions(limit=5, include_superseded=True))
    assert any(e.content == "Tom: I work at Harbor Bank as a risk analyst." for e in old)


@pytest.mark.parametrize("line", [
    "Carol: Bob, where do you live these days?",        # a question tells nothing
    "Bob: I moved my desk by the window and it helps.",  # a cue word, but no new home named
    "Bob: I almost moved to Tallinn once, the rent was too high.",  # hedged: it did not happen
])
def test_what_does_not_retire_bobs_home(rules, line):
    rules.remember_sync("Bob: I live in Leeds, near the old docks.")
    res = rules.remember_sync(line)
    assert not [r for r in res.evolutions if r.evolution_type.supersedes], res.evolutions
    assert current(rules, "Bob: I live in Leeds, near the old docks.")


@pytest.mark.parametrize("line", [
    "Bob: I relocated to York last week, still finding my way around.",
    "Bob: We finally moved to York!",
    "Bob: Goodbye Leeds, hello York: new flat, new life.",  # no pronoun: news about the speaker
])
def test_a_move_told_in_many_ways_retires_the_old_home(rules, line):
    rules.remember_sync("Bob: I live in Leeds, near the old docks.")
    rules.remember_sync(line)
    assert not current(rules, "Bob: I live in Leeds, near the old docks.")


def test_a_question_put_to_someone_is_never_retired_by_their_answer(rules):
    rules.remember_sync("Carol: Bob, where are you living these days?")
    rules.remember_sync("Bob: I moved to York now.")
    assert current(rules, "Carol: Bob, where are you living these days?")


def test_after_a_speaker_label_the_first_word_starts_the_sentence():
    got = {f.name for f in rule_extract("Amara: First week at Fernhill School done.")}
    assert got == {"Amara", "Fernhill School"}


@pytest.mark.parametrize("old,new", [
    # "I'm" in both is no shared subject ("m" is what is left of a contraction)
    ("Ravi: I'm allergic to kiwi, so be careful.", "Ravi: I'm gluten-free these days."),
    # the speaker label in both is no shared name: it says who spoke
    ("Tom: My brother Rosa is visiting next month.", "Tom: Rosa is training to be a barista now."),
])
def test_facts_about_different_things_do_not_update_each_other(old, new):
    from umi.pipeline.evolution import Candidate, rule_classify

    name = "Rosa" if "Rosa" in new else "Ravi"
    (d,) = rule_classify(Candidate("n", name, "person", new), [Candidate("o", name, "person", old)])
    assert d.evolution_type is EvolutionType.EXTEND


@pytest.mark.parametrize("line,about_bob", [
    ("Bob: I work at Acme.", True),
    ("Bob: We finally moved to York!", True),                       # first person plural
    ("Bob: First week at Acme done, so different from Initech.", True),  # news without a subject
    ("Bob: Good for you.", False),                                  # small talk names nothing
    ("Bob: Alice got promoted.", False),                            # about Alice
])
def test_a_speakers_line_is_filed_under_them_when_it_tells_about_them(line, about_bob):
    got = {f.name for f in rule_extract(line)}
    assert ("Bob" in got) is about_bob
    # nothing told is lost: a line about nobody is kept as a note
    from umi.pipeline.extraction import with_leftovers

    kept, _ = with_leftovers(line, rule_extract(line))
    assert any(line in f.content or f.content in line for f in kept)


def test_a_question_is_answered_by_what_was_told_not_by_a_question_with_its_words(rules):
    # Carol's question shares every word of the one asked later; Priya's answer shares few.
    # (Raw notes: no names to file facts under, so only the words and the telling decide.)
    raw = umi.RememberOptions().without_extraction()
    rules.remember_sync("Priya: I'm a data analyst at Lumen Labs.", raw)
    rules.remember_sync("Carol: Priya, where do you work these days?", raw)
    top = rules.recall_sync("Where does Priya work these days?", RecallOptions(limit=2).fast_only())
    assert top[0].content == "Priya: I'm a data analyst at Lumen Labs."


def test_rrf_takes_a_ranking_with_ties():
    fused = dict(rrf_fuse([["a", "b"], {"a": 1, "b": 1}], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 61) and fused["b"] == pytest.approx(1 / 62 + 1 / 61)


HOP_CHAT = ["Priya: My beagle Rex chewed my headphones again.",
            "Sam: My weekend thing is sailing, it keeps me sane.",
            "Priya: I've been really into climbing lately.",
            "Ana: I've been really into painting lately.",
            "Tom: My weekend thing is chess, it keeps me sane.",
            "Sam: Ana, what do you do for fun these days?"]


@pytest.mark.parametrize("question", ["What does Rex's owner do for fun?", "What hobby does the owner of Rex have?"])
def test_a_second_hop_finds_the_fact_of_someone_the_question_names_only_through_another(rules, monkeypatch,
                                                                                          question):
    # the answer is Priya's, whom the question does not name: Rex's fact names her, and her facts
    # are one more ranking (hop_signal); without it the words and the vector rank other hobbies first
    for line in HOP_CHAT:
        rules.remember_sync(line)
    answer = "Priya: I've been really into climbing lately."

    def top(n):
        return [e.content for e in rules.recall_sync(question, RecallOptions(limit=n).fast_only())]

    assert answer in top(3)
    monkeypatch.setattr(recall_mod, "hop_signal", lambda *a, **k: [])
    assert answer not in top(3)


def test_a_second_hop_follows_only_a_question_that_names_something(rules, monkeypatch):
    from umi.pipeline import retrieval

    for line in HOP_CHAT:
        rules.remember_sync(line)
    read: list[str] = []
    real = retrieval.read_named
    monkeypatch.setattr(retrieval, "read_named", lambda st, names, f: read.extend(names) or real(st, names, f))
    for query in ("what does the owner of the beagle do for fun?", "Rex's owner likes fun things"):
        rules.recall_sync(query, RecallOptions(limit=3).fast_only())
    assert read == []  # no name in the first, not a question in the second: no hop read
    rules.recall_sync("What does Rex's owner do for fun?", RecallOptions(limit=3).fast_only())
    assert "Priya" in read and "Rex" not in read and len(read) <= retrieval.HOP_NAMES_MAX


def test_a_second_hop_never_goes_through_the_user_under_whom_every_first_person_fact_is_filed(
        rules, monkeypatch):
    from umi.pipeline import retrieval

    for line in ("I met Alice in Oslo last week.", "I like green tea.", "I work at Initech.",
                 "Alice: I teach chemistry at a school."):
        rules.remember_sync(line)
    read: list[str] = []
    real = retrieval.read_named
    monkeypatch.setattr(retrieval, "read_named", lambda st, names, f: read.extend(names) or real(st, names, f))
    top = rules.recall_sync("Does Alice like green tea?", RecallOptions(limit=3).fast_only())
    assert "I like green tea." in [e.content for e in top]  # filed under the user, found by its words
    assert read == ["Oslo"]  # the other facts' other name; not "User" (a hop there reads every "I ..." fact)
