"""Time through the whole memory: event times from the text, the time signal, filters and sorting."""

import datetime as dt

import pytest

import umi
from umi.pipeline.time import DAY_MS

UTC = dt.timezone.utc


def ms(y, m, d, h=0):
    return int(dt.datetime(y, m, d, h, tzinfo=UTC).timestamp() * 1000)


def go_to(mem, when_ms):
    mem.clock.jump(when_ms - mem.clock.now_ms())


@pytest.fixture
def mem():
    m = umi.Memory.sim(seed=7)
    yield m
    m.close()


def test_remember_takes_the_event_time_from_the_text_unless_given(mem):
    go_to(mem, ms(2024, 1, 10, 18))
    told = mem.remember_sync("Alice ran the Leeds half marathon yesterday.", umi.RememberOptions().without_extraction())
    assert [e.event_time for e in told.entities] == [ms(2024, 1, 9)]
    given = mem.remember_sync("Alice ran the York 10k yesterday.",
                              umi.RememberOptions(event_time=ms(2020, 5, 5)).without_extraction())
    assert [e.event_time for e in given.entities] == [ms(2020, 5, 5)]
    plain = mem.remember_sync("Alice likes tea.", umi.RememberOptions().without_extraction())
    assert [e.event_time for e in plain.entities] == [None]
    # stored, not only returned
    assert mem.get_sync(told.entities[0].id).event_time == ms(2024, 1, 9)


def _bouldering_story(mem):
    """Alice goes bouldering three times, in three months; each told a little later."""
    opts = umi.RememberOptions().without_extraction()
    go_to(mem, ms(2023, 11, 14, 18))
    nov = mem.remember_sync("Alice went bouldering at the Arch two days ago.", opts).entities[0]
    go_to(mem, ms(2023, 12, 20, 18))
    dec = mem.remember_sync("Alice went bouldering at the Arch last Saturday.", opts).entities[0]
    go_to(mem, ms(2024, 1, 10, 18))
    jan = mem.remember_sync("Alice went bouldering at the Arch yesterday.", opts).entities[0]
    return nov, dec, jan


def test_a_question_naming_a_month_gets_that_months_fact_first(mem):
    nov, dec, jan = _bouldering_story(mem)
    assert (nov.event_time, dec.event_time, jan.event_time) == (ms(2023, 11, 12), ms(2023, 12, 16), ms(2024, 1, 9))
    fast = umi.RecallOptions(limit=3).fast_only()
    assert mem.recall_sync("What did Alice do last month?", fast)[0].id == dec.id
    assert mem.recall_sync("What was Alice up to in November?", fast)[0].id == nov.id
    # the same questions without a time get no time list: all three still come back
    assert {e.id for e in mem.recall_sync("What did Alice do?", fast)} == {nov.id, dec.id, jan.id}


def test_a_when_question_prefers_facts_that_carry_a_time(mem):
    opts = umi.RememberOptions().without_extraction()
    go_to(mem, ms(2024, 3, 12, 18))
    undated = mem.remember_sync("Bob ran the marathon and talked about the marathon for hours.", opts).entities[0]
    dated = mem.remember_sync("Bob ran a marathon on March 3rd.", opts).entities[0]
    assert undated.event_time is None and dated.event_time == ms(2024, 3, 3)
    got = mem.recall_sync("When did Bob run the marathon?", umi.RecallOptions(limit=2).fast_only())
    assert [e.id for e in got] == [dated.id, undated.id]


def test_filter_and_sort_on_event_time(mem):
    nov, dec, jan = _bouldering_story(mem)
    december = umi.RecallOptions(limit=5).fast_only().with_event_time_range(ms(2023, 12, 1), ms(2024, 1, 1) - 1)
    assert [e.id for e in mem.recall_sync("Alice bouldering", december)] == [dec.id]
    # created_at (the default time field) puts the January fact in December's window instead:
    told_in_december = umi.RecallOptions(limit=5).fast_only().with_time_range(ms(2023, 12, 1), ms(2024, 1, 1) - 1)
    assert [e.id for e in mem.recall_sync("Alice bouldering", told_in_december)] == [dec.id]
    newest = umi.RecallOptions(limit=5).fast_only().sorted_by("event_time")
    assert [e.id for e in mem.recall_sync("Alice bouldering", newest)] == [jan.id, dec.id, nov.id]
    oldest = umi.RecallOptions(limit=5).fast_only().sorted_by("event_time", ascending=True)
    assert [e.id for e in mem.recall_sync("Alice bouldering", oldest)] == [nov.id, dec.id, jan.id]


def test_sorting_puts_undated_facts_last_and_keeps_limit(mem):
    nov, dec, jan = _bouldering_story(mem)
    plain = mem.remember_sync("Alice loves bouldering at the Arch.", umi.RememberOptions().without_extraction())
    got = mem.recall_sync("Alice bouldering Arch", umi.RecallOptions(limit=4).fast_only().sorted_by("event_time"))
    assert [e.id for e in got] == [jan.id, dec.id, nov.id, plain.entities[0].id]
    by_told = mem.recall_sync("Alice bouldering Arch", umi.RecallOptions(limit=2).fast_only().sorted_by("created_at"))
    assert len(by_told) == 2
    assert by_told[0].created_at >= by_told[1].created_at


def test_time_options_are_checked():
    with pytest.raises(umi.InvalidConfigError, match="sort_by"):
        umi.RecallOptions(sort_by="importance")  # type: ignore[arg-type]
    with pytest.raises(umi.InvalidFilterError, match="time_field"):  # SearchFilters' rule
        umi.RecallOptions(time_field="updated_at")  # type: ignore[arg-type]


def test_recall_options_hold_one_search_filters(mem):
    """RecallOptions carries a SearchFilters: the same filter as count/list, with the keywords as shortcuts."""
    nov, dec, jan = _bouldering_story(mem)
    window = (ms(2023, 12, 1), ms(2024, 1, 1) - 1)
    where = umi.SearchFilters(time_range=window, time_field="event_time")
    by_filters = umi.RecallOptions(limit=5, filters=where).fast_only()
    by_keywords = umi.RecallOptions(limit=5, time_range=window, time_field="event_time").fast_only()
    assert by_filters == by_keywords and by_keywords.filters == where
    assert [e.id for e in mem.recall_sync("Alice bouldering", by_filters)] == [dec.id]
    assert mem.count_sync(where=where) == 1  # one rule: recall and count agree
    # a keyword replaces that field of the filters, leaving the others
    wider = umi.RecallOptions(limit=5, filters=where, time_range=(ms(2023, 11, 1), window[1])).fast_only()
    assert wider.time_field == "event_time"
    assert [e.id for e in mem.recall_sync("Alice bouldering", wider)] == [dec.id, nov.id]
    # a chained with_* keeps the rest of the filters
    assert by_filters.with_superseded().filters == umi.SearchFilters(
        time_range=window, time_field="event_time", include_superseded=True)
    # a field only SearchFilters has: the facts of one told text
    only_jan = umi.RecallOptions(limit=5, filters=umi.SearchFilters(source_id=jan.source_id)).fast_only()
    assert [e.id for e in mem.recall_sync("Alice bouldering", only_jan)] == [jan.id]
    with pytest.raises(TypeError, match="SearchFilters"):
        umi.RecallOptions(filters={"time_range": window})  # type: ignore[arg-type]
    assert umi.RecallOptions(as_of=2**80).filters.norm == umi.SearchFilters(as_of=2**80).norm  # clamped once
    with pytest.raises(TypeError, match="sort_ascending"):
        umi.RecallOptions(sort_ascending=1)  # type: ignore[arg-type]


def test_sim_time_is_deterministic():
    def run():
        m = umi.Memory.sim(seed=3)
        try:
            _bouldering_story(m)
            return [(e.id, e.event_time, e.score) for e in
                    m.recall_sync("What did Alice do last month?", umi.RecallOptions(limit=3).fast_only())]
        finally:
            m.close()

    assert run() == run()
    assert DAY_MS == 86_400_000


def test_a_question_about_now_prefers_what_was_told_later(mem):
    # raw notes: no evolution detection, so both facts stay current. Vector and keywords split
    # between them here; a question about *now* lets recency decide.
    opts = umi.RememberOptions().without_extraction()
    go_to(mem, ms(2024, 1, 5, 18))
    old = mem.remember_sync("Alice: I have lived in Bristol for years.", opts).entities[0]
    go_to(mem, ms(2024, 2, 20, 18))
    new = mem.remember_sync("Alice: the move is done, my flat is in Leeds.", opts).entities[0]
    go_to(mem, ms(2024, 3, 1, 12))
    fast = umi.RecallOptions(limit=2).fast_only()
    assert [e.id for e in mem.recall_sync("Where does Alice live now?", fast)] == [new.id, old.id]
    assert [e.id for e in mem.recall_sync("Where does Alice live these days?", fast)] == [new.id, old.id]
