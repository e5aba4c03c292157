"""Rule extraction, evolution rules, fusion and rewrites: the logic the Sim LLM and the no-LLM path share."""

import json

import pytest

from umi import EntityType, EvolutionType, InvalidResponseError, SimEmbeddingProvider, SimLLMProvider
from umi.pipeline import schemas
from umi.pipeline.evolution import Candidate, parse_evolution, rule_classify
from umi.pipeline.extraction import note_for, parse_extraction, rule_extract
from umi.pipeline.retrieval import is_question, needs_deep_search, rrf_fuse, rule_rewrite


def names(text):
    return [(e.name, e.entity_type) for e in rule_extract(text)]


def test_extracts_people_and_organisations_with_types():
    assert names("Alice works at Acme Corp") == [
        ("Alice", EntityType.PERSON),
        ("Acme Corp", EntityType.ORGANIZATION),
    ]


def test_context_rules_type_names_without_suffixes():
    got = dict(names("Alice left Acme and now works at Initech."))
    assert got == {"Alice": EntityType.PERSON, "Acme": EntityType.ORGANIZATION, "Initech": EntityType.ORGANIZATION}
    assert dict(names("Bob lives in Berlin."))["Berlin"] == EntityType.LOCATION
    assert dict(names("Carol manages Project Apollo."))["Project Apollo"] == EntityType.PROJECT
    assert dict(names("Dan spoke at the Rust Conference."))["Rust Conference"] == EntityType.EVENT


def test_pronouns_and_function_words_are_not_names_and_pronouns_resolve():
    ents = rule_extract("Bob is an engineer at Google. He loves hiking on Monday.")
    assert [(e.name, e.content) for e in ents] == [
        ("Bob", "Bob is an engineer at Google."),
        ("Google", "Bob is an engineer at Google."),
        ("Bob", "Bob loves hiking on Monday."),
    ]


def test_first_person_becomes_self_and_tasks_are_found():
    got = names("My sister Carol lives in Paris.")
    assert got[0] == ("User", EntityType.SELF)
    assert ("Carol", EntityType.PERSON) in got
    assert ("remind me to call the dentist", EntityType.TASK) in names("remind me to call the dentist")


def test_text_without_names_extracts_nothing_and_note_for_keeps_text():
    assert rule_extract("the weather is nice") == []
    n = note_for("  the weather   is nice today and it is going to stay that way for a good long while yes  ")
    assert n.entity_type == EntityType.NOTE
    assert n.content == "the weather   is nice today and it is going to stay that way for a good long while yes"
    assert n.name.endswith("…") and len(n.name) <= 61


def test_parse_extraction_validates_and_dedupes():
    data = {"entities": [
        {"name": "Alice", "entity_type": "person", "content": "Alice codes."},
        {"name": "alice", "entity_type": "PERSON", "content": "alice codes.", "confidence": 0.5},
    ]}
    got = parse_extraction(data)
    assert [(e.name, e.entity_type, e.confidence) for e in got] == [("Alice", EntityType.PERSON, 0.8)]
    for bad in ({}, {"entities": "x"}, {"entities": [{"name": "", "entity_type": "person", "content": "c"}]},
                {"entities": [{"name": "A", "entity_type": "alien", "content": "c"}]},
                {"entities": [{"name": "A", "entity_type": "person", "content": "c", "confidence": 2}]}):
        with pytest.raises(InvalidResponseError):
            parse_extraction(bad)


OLD = Candidate("old", "Alice", "person", "Alice works at Acme Corp")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("Alice left Acme and now works at Initech", EvolutionType.UPDATE),
        ("Alice no longer works at Acme Corp", EvolutionType.UPDATE),
        ("Alice does not work at Acme Corp", EvolutionType.CONTRADICT),
        ("Alice has a cat named Tom", EvolutionType.EXTEND),
        ("Alice works at Acme Corp so Alice commutes to Acme Corp", EvolutionType.DERIVE),
    ],
)
def test_rule_classify_cues(content, expected):
    (d,) = rule_classify(Candidate("new", "Alice", "person", content), [OLD])
    assert d.candidate_id == "old" and d.evolution_type == expected and 0 < d.confidence <= 1


def test_rule_classify_ignores_unrelated_and_self():
    assert rule_classify(Candidate("new", "Bob", "person", "Bob likes tea"), [OLD]) == []
    assert rule_classify(Candidate("old", "Alice", "person", "Alice likes tea"), [OLD]) == []


def test_parse_evolution_rejects_unknown_candidates_and_drops_none():
    data = {"relations": [
        {"candidate_id": "a", "evolution_type": "none", "reason": "", "confidence": 1},
        {"candidate_id": "b", "evolution_type": "update", "reason": "moved", "confidence": 0.7},
    ]}
    got = parse_evolution(data, ["a", "b"])
    assert [(d.candidate_id, d.evolution_type) for d in got] == [("b", EvolutionType.UPDATE)]
    with pytest.raises(InvalidResponseError, match="unknown candidate"):
        parse_evolution({"relations": [{"candidate_id": "zz", "evolution_type": "update"}]}, ["a"])


def test_rrf_fusion_scores_and_breaks_ties_by_id():
    fused = rrf_fuse([["a", "b"], ["b", "c"], ["d"]], k=60)
    assert [i for i, _ in fused] == ["b", "a", "d", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == fused[2][1] == pytest.approx(1 / 61)


def test_question_detection_and_deep_rule():
    assert is_question("Who works at Acme?") and is_question("where does bob live")
    assert not is_question("Alice Acme")
    strong = [("x", 0.04)] * 10
    assert not needs_deep_search("Who is Alice?", strong, 10, 0.025)
    assert needs_deep_search("Who is Alice?", [("x", 0.016)] * 10, 10, 0.025)
    assert needs_deep_search("Who is Alice?", strong[:3], 10, 0.025)
    assert not needs_deep_search("Alice", [], 10, 0.025)


def test_rule_rewrite_gives_distinct_variants():
    v = rule_rewrite("Who is Alice's employer?")
    assert 2 <= len(v) <= 4 and len(set(x.lower() for x in v)) == len(v)
    assert "Alice" in v and any("works" in x for x in v)


def test_sim_llm_answers_match_the_schemas_and_are_seeded():
    llm1, llm2, llm3 = SimLLMProvider(1), SimLLMProvider(1), SimLLMProvider(2)
    p = schemas.extraction_prompt("Alice works at Acme Corp")
    a = llm1.complete_json(schemas.EXTRACTION_SYSTEM, p, schemas.EXTRACTION_SCHEMA, task="extract_entities")
    b = llm2.complete_json(schemas.EXTRACTION_SYSTEM, p, schemas.EXTRACTION_SCHEMA, task="extract_entities")
    c = llm3.complete_json(schemas.EXTRACTION_SYSTEM, p, schemas.EXTRACTION_SCHEMA, task="extract_entities")
    assert a.data == b.data and a.data != c.data
    assert [e["name"] for e in a.data["entities"]] == [e["name"] for e in c.data["entities"]]
    assert a.usage.calls == 1 and a.usage.input_tokens > 0 and llm1.calls["extract_entities"] == 1
    ep = schemas.evolution_prompt({"id": "n", "name": "Alice", "entity_type": "person", "content": "Alice now works at Initech"},
                                  [{"id": "o", "name": "Alice", "entity_type": "person", "content": "Alice works at Acme"},
                                   {"id": "z", "name": "Zed", "entity_type": "person", "content": "Zed sings"}])
    r = llm1.complete_json(schemas.EVOLUTION_SYSTEM, ep, schemas.EVOLUTION_SCHEMA, task="classify_evolution")
    assert [(x["candidate_id"], x["evolution_type"]) for x in r.data["relations"]] == [("o", "update"), ("z", "none")]
    json.dumps(r.data)  # plain JSON, as a real model's answer


def test_sim_embedder_is_seeded_normalised_and_lexical():
    import numpy as np

    e = SimEmbeddingProvider(7, dim=64)
    v = e.embed(["Alice works at Acme", "Where does Alice work?", "Paris weather is sunny"])
    assert v.shape == (3, 64) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
    assert np.array_equal(v, SimEmbeddingProvider(7, dim=64).embed(["Alice works at Acme", "Where does Alice work?", "Paris weather is sunny"]))
    assert not np.array_equal(v, SimEmbeddingProvider(8, dim=64).embed(["Alice works at Acme", "Where does Alice work?", "Paris weather is sunny"]))
    with pytest.raises(TypeError):
        e.embed("not a list")
    with pytest.raises(TypeError):
        e.embed([1])


def test_updates_need_the_facts_to_speak_of_the_same_thing():
    acme_new = Candidate("n", "Acme Corp", "organization", "Alice left Acme Corp and now works at Initech")
    alice_old = Candidate("a", "Acme Corp", "organization", "Alice is a software engineer at Acme Corp")
    carol_old = Candidate("c", "Acme Corp", "organization", "Carol manages the Apollo project at Acme Corp")
    got = {d.candidate_id: d.evolution_type for d in rule_classify(acme_new, [alice_old, carol_old])}
    assert got == {"a": EvolutionType.UPDATE, "c": EvolutionType.EXTEND}
    moved = Candidate("n", "Bob", "person", "Bob moved to Munich")
    home = Candidate("h", "Bob", "person", "Bob lives in Berlin")
    hobby = Candidate("x", "Bob", "person", "Bob plays chess")
    got = {d.candidate_id: d.evolution_type for d in rule_classify(moved, [home, hobby])}
    assert got == {"h": EvolutionType.UPDATE, "x": EvolutionType.EXTEND}


# --- issue 10: every sentence kept; sentence starts, numbers and amounts are not people -------


def test_issue_example_sentence_start_is_not_a_person():
    assert rule_extract("Budget is tight this quarter.") == []
    assert names("We raised 5M from Sequoia.") == [("Sequoia", EntityType.PERSON)]
    assert rule_extract("5M is a lot") == [] and rule_extract("2024 was a good year") == []


@pytest.mark.parametrize("text, expected", [
    ("In Chicago it snowed.", ["Chicago"]),
    ("Took Biscuit to the vet.", ["Biscuit"]),
    ("Welcome, Miso!", ["Miso"]),
    ("Honestly the nights wreck my sleep.", ["User"]),
    ("Congratulations on the promotion!", []),
    ("Planning the trip with Jordan.", ["Jordan"]),
    ("Grace studies marine biology", ["Grace"]),
    ("Will is here. I met Will yesterday.", ["Will", "User", "Will"]),  # capitalised mid-sentence: a name
])
def test_only_names_start_names(text, expected):
    assert [e.name for e in rule_extract(text)] == expected


def test_with_leftovers_keeps_every_sentence_once():
    from umi.pipeline.extraction import uncovered_sentences, with_leftovers

    text = "Alice works at Acme Corp.\nwe agreed the budget is five million dollars"
    found = rule_extract(text)
    assert uncovered_sentences(text, found) == ["we agreed the budget is five million dollars"]
    kept, left = with_leftovers(text, found)
    assert left == 1 and kept[:-1] == found
    assert (kept[-1].entity_type, kept[-1].content) == (EntityType.NOTE, "we agreed the budget is five million dollars")
    assert with_leftovers("Bob plays chess.", rule_extract("Bob plays chess.")) == (rule_extract("Bob plays chess."), 0)
    whole, n = with_leftovers("the weather is nice. it may rain", [])
    assert n == 1 and [(e.entity_type, e.content) for e in whole] == [(EntityType.NOTE, "the weather is nice. it may rain")]
    # an LLM that rephrases still covers the sentence (5-letter stems); one that drops it does not
    from umi.pipeline.extraction import ExtractedEntity

    llm = [ExtractedEntity("User", EntityType.SELF, "User works as an ER nurse at Northwestern Memorial")]
    assert uncovered_sentences("I work as an ER nurse at Northwestern Memorial. My cat is called Miso.", llm) == [
        "My cat is called Miso."]


def test_coverage_is_not_fooled_by_shared_common_words():
    from umi.pipeline.extraction import uncovered_sentences

    text = "we keeps the qbbfix near qbbgix. Alice keeps qbbdix and qbbbbix. we keeps the qbbbix near qbbcix."
    assert uncovered_sentences(text, rule_extract(text)) == ["we keeps the qbbfix near qbbgix."]
