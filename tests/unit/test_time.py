"""The date resolver: phrases x reference times -> the day (or span) they name."""

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from umi.pipeline.time import (
    DAY_MS,
    find_time_spans,
    is_temporal_query,
    query_time_range,
    resolve_event_time,
)

UTC = dt.timezone.utc


def ms(y, m, d, h=0):
    return int(dt.datetime(y, m, d, h, tzinfo=UTC).timestamp() * 1000)


def day(y, m, d):
    return (ms(y, m, d), ms(y, m, d) + DAY_MS - 1)


def days(a, b):
    return (ms(*a), ms(*b) + DAY_MS - 1)


WED = ms(2025, 3, 12, 15)  # Wednesday 12 March 2025, 15:00 UTC
SUN = ms(2024, 12, 29, 10)  # Sunday 29 December 2024: the year turns within a week
LEAP = ms(2024, 3, 31, 23)  # Sunday 31 March 2024, late evening: a month back is 29 February

TABLE = [
    # (reference, text, expected span)
    (WED, "I ran the 10k yesterday.", day(2025, 3, 11)),
    (WED, "We met the day before yesterday", day(2025, 3, 10)),
    (WED, "This morning I fed the cat", day(2025, 3, 12)),
    (WED, "Dinner tonight?", day(2025, 3, 12)),
    (WED, "I'm flying tomorrow", day(2025, 3, 13)),
    (WED, "I started two weeks ago", day(2025, 2, 26)),
    (WED, "It broke 3 days ago", day(2025, 3, 9)),
    (WED, "a couple of days ago we talked", day(2025, 3, 10)),
    (WED, "I moved here a month ago", day(2025, 2, 12)),
    (WED, "We married a year ago", day(2024, 3, 12)),
    (WED, "The results come in two weeks", day(2025, 3, 26)),
    (WED, "I saw her last Tuesday", day(2025, 3, 11)),
    (WED, "I saw her last Wednesday", day(2025, 3, 5)),
    (WED, "Church last Sunday was long", day(2025, 3, 9)),
    (WED, "See you next Monday", day(2025, 3, 17)),
    (WED, "The party is this Friday", day(2025, 3, 14)),
    (WED, "On Saturday we went hiking", day(2025, 3, 8)),
    (WED, "On Saturday we will go hiking", day(2025, 3, 15)),
    (WED, "Last weekend was fun", days((2025, 3, 8), (2025, 3, 9))),
    (WED, "What did Tom do last week?", days((2025, 3, 3), (2025, 3, 9))),
    (WED, "What did Tom do last month?", days((2025, 2, 1), (2025, 2, 28))),
    (WED, "busy this month", days((2025, 3, 1), (2025, 3, 31))),
    (WED, "next month I start", days((2025, 4, 1), (2025, 4, 30))),
    (WED, "last year was hard", days((2024, 1, 1), (2024, 12, 31))),
    (WED, "I lived in Lisbon in 2019", days((2019, 1, 1), (2019, 12, 31))),
    (WED, "Back in 2008 I had a Nokia", days((2008, 1, 1), (2008, 12, 31))),
    (WED, "We saw Radiohead on March 3rd", day(2025, 3, 3)),
    (WED, "We saw Radiohead on the 3rd of March", day(2025, 3, 3)),
    (WED, "on December 28th we flew home", day(2024, 12, 28)),
    (WED, "On April 2nd, 2019 I graduated", day(2019, 4, 2)),
    (WED, "the launch on Apr. 2 will be big", day(2025, 4, 2)),
    (WED, "I was in Rome in January", days((2025, 1, 1), (2025, 1, 31))),
    (WED, "I was in Rome in November", days((2024, 11, 1), (2024, 11, 30))),
    (WED, "In November we will move", days((2025, 11, 1), (2025, 11, 30))),
    (WED, "in May the garden was lovely", days((2024, 5, 1), (2024, 5, 31))),
    (WED, "since June 2021 I work remotely", days((2021, 6, 1), (2021, 6, 30))),
    (WED, "deadline 2023-07-14", day(2023, 7, 14)),
    (SUN, "last weekend", days((2024, 12, 28), (2024, 12, 29))),
    (SUN, "next week", days((2024, 12, 30), (2025, 1, 5))),
    (SUN, "next month", days((2025, 1, 1), (2025, 1, 31))),
    (SUN, "tomorrow", day(2024, 12, 30)),
    (SUN, "in January", days((2024, 1, 1), (2024, 1, 31))),
    (SUN, "in January I'll start", days((2025, 1, 1), (2025, 1, 31))),
    (SUN, "a month ago", day(2024, 11, 29)),
    (SUN, "last Sunday", day(2024, 12, 22)),
    (SUN, "on January 2nd we'll fly", day(2025, 1, 2)),
    (LEAP, "a month ago", day(2024, 2, 29)),
    (LEAP, "last month", days((2024, 2, 1), (2024, 2, 29))),
    (LEAP, "yesterday", day(2024, 3, 30)),
]


@pytest.mark.parametrize("now, text, span", TABLE, ids=[f"{i:02d}-{t[1][:24]}" for i, t in enumerate(TABLE)])
def test_phrase_table(now, text, span):
    spans = find_time_spans(text, now)
    assert spans, f"no time found in {text!r}"
    assert (spans[0].start_ms, spans[0].end_ms) == span
    assert resolve_event_time(text, now) == span[0]
    assert query_time_range(text, now) == span


@pytest.mark.parametrize("text", [
    "I may go to the party", "We should meet up", "Mayday is a band", "my 2nd favourite", "Route 2019B", "",
    "on Saturdays I swim? no: Saturdays", "in 1850 things were different",
])
def test_no_time_in_text_gives_none(text):
    assert resolve_event_time(text, WED) is None
    assert query_time_range(text, WED) is None


def test_first_expression_wins_and_the_query_range_spans_all():
    text = "Yesterday I booked the flight for next Monday."
    spans = find_time_spans(text, WED)
    assert [s.phrase for s in spans] == ["Yesterday", "next Monday"]
    assert resolve_event_time(text, WED) == ms(2025, 3, 11)
    assert query_time_range(text, WED) == (ms(2025, 3, 11), ms(2025, 3, 17) + DAY_MS - 1)


def test_overlapping_phrases_keep_the_longest():
    # "the day before yesterday" contains "yesterday": only the long phrase counts
    assert [s.phrase for s in find_time_spans("the day before yesterday", WED)] == ["the day before yesterday"]


def test_temporal_questions():
    assert is_temporal_query("When did Iris go hiking?")
    assert is_temporal_query("On what date did Tom run the half marathon?")
    assert is_temporal_query("What did Tom do last month?")
    assert is_temporal_query("What was Priya up to in January?")
    assert not is_temporal_query("Where does Priya work?")
    assert not is_temporal_query("What is the name of Tom's dog?")


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="now_ms"):
        resolve_event_time("yesterday", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="now_ms"):
        resolve_event_time("yesterday", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text"):
        resolve_event_time(None, WED)  # type: ignore[arg-type]


# --- properties against a plain-Python model ---------------------------------------------------

NOW = st.integers(min_value=ms(1990, 1, 1), max_value=ms(2150, 1, 1))


@given(NOW, st.integers(min_value=0, max_value=999))
def test_n_days_ago_is_the_calendar_day_n_days_back(now, n):
    today = dt.datetime.fromtimestamp(now / 1000, tz=UTC).date()
    want = today - dt.timedelta(days=n)
    assert resolve_event_time(f"it happened {n} days ago", now) == ms(want.year, want.month, want.day)


@given(NOW, st.sampled_from(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]))
def test_last_weekday_is_the_latest_such_day_strictly_before(now, name):
    today = dt.datetime.fromtimestamp(now / 1000, tz=UTC).date()
    got = dt.datetime.fromtimestamp(resolve_event_time(f"last {name}", now) / 1000, tz=UTC).date()
    assert got.strftime("%A").lower() == name
    assert today - dt.timedelta(days=7) <= got < today


@given(NOW, st.sampled_from([t[1] for t in TABLE]))
def test_spans_are_whole_utc_days_and_ordered(now, text):
    for s in find_time_spans(text, now):
        assert s.start_ms % DAY_MS == 0
        assert (s.end_ms + 1) % DAY_MS == 0
        assert s.start_ms <= s.end_ms


_WORDS = ("in on last this next the of since by until early mid yesterday today tonight tomorrow "
          "week weekend month year fortnight day days ago two 3 12th 2023 2023-03-14 March Mar. "
          "monday Friday night morning back during from Alice moved to Berlin , . ?").split()


@given(st.lists(st.sampled_from(_WORDS), max_size=8))
def test_the_one_scan_prefilter_drops_no_match(words):
    """``time_matches`` skips the patterns when their one-alternation scan finds nothing: it must
    find something whenever any pattern does (else a time word would be lost)."""
    from umi.pipeline import time as T

    text = " ".join(words)
    every = [(kind, m.span()) for pattern, kind in T._PATTERNS for m in pattern.finditer(text)]
    assert [(kind, m.span()) for kind, m in T.time_matches(text)] == every
    assert (T._ANY_TIME.search(text) is None) == (not every)
