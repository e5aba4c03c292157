"""Dates and relative dates in text, resolved against a reference time.

``resolve_event_time(text, now_ms)`` gives a remembered fact its ``event_time`` when the caller
gave none: "I ran the Leeds 10k yesterday", told at ``now_ms``, happened the day before.
``query_time_range(query, now_ms)`` turns a question's time words ("last month", "in March",
"two weeks ago") into an inclusive millisecond range for the time signal of recall.

Pure functions of ``(text, now_ms)``: no wall clock is read here, so under Sim (whose clock the
caller passes) every answer is deterministic. Days are UTC days.

What is understood (case-insensitive; the first expression in the text wins for
``resolve_event_time``):

======================================  =====================================================
phrase                                  span
======================================  =====================================================
today, this morning/afternoon/evening,  the reference day
tonight, earlier today
yesterday, last night                   the day before
the day before yesterday                two days before
tomorrow                                the day after
N days/weeks/months/years ago           that day (N in digits or words; "a", "a couple of")
in N days/weeks (future)                that day
last/this/next <weekday>                last = the latest such day strictly before the
                                        reference day; next = the first strictly after;
                                        this = that day of the reference week (Mon–Sun)
on <weekday>                            the latest such day strictly before (or, with a
                                        future cue in the sentence, the first after)
last/this/next weekend                  Saturday–Sunday (last = the latest Saturday strictly
                                        before the reference day, and the Sunday after it)
last/this/next week|month|year          that calendar week (Mon–Sun) / month / year
(on) <Month> <day>[st|nd|rd|th][, Y]    that day
<day>[st|…] (of) <Month> [Y]            that day
in/during/since <Month> [Y]             that month
in/since/back in <YYYY>, in the year Y  that year
YYYY-MM-DD                              that day
======================================  =====================================================

A day or month named without a year is taken in the past (the latest one not after the
reference day) — memories mostly tell what happened — unless the sentence carries a future cue
("will", "going to", "next", "planning", "tomorrow", "'ll", "upcoming"), when the next one is taken.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass

__all__ = ["TimeSpan", "find_time_spans", "resolve_event_time", "query_time_range", "is_temporal_query",
           "DAY_MS"]

DAY_MS = 86_400_000
_UTC = dt.timezone.utc

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_name) if m}
_MONTHS.update({m.lower(): i for i, m in enumerate(calendar.month_abbr) if m})
_MONTHS["sept"] = 9
_WEEKDAYS = {d.lower(): i for i, d in enumerate(calendar.day_name)}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a few": 3,
            "couple of": 2, "few": 3}

_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_WD_RE = "|".join(_WEEKDAYS)
_NUM_RE = r"\d{1,3}|a couple of|couple of|a few|an|a|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
_FUTURE = re.compile(r"\b(?:will|going to|gonna|next|planning|plan to|tomorrow|upcoming|soon)\b|'ll\b", re.I)
_YEAR_MIN, _YEAR_MAX = 1900, 2200


@dataclass(frozen=True)
class TimeSpan:
    """An inclusive range of UTC milliseconds that a phrase of the text names."""

    start_ms: int
    end_ms: int
    phrase: str
    offset: int  # where the phrase starts in the text


def _day_start(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=_UTC).timestamp() * 1000)


def _days(first: dt.date, last: dt.date) -> tuple[int, int]:
    return _day_start(first), _day_start(last) + DAY_MS - 1


def _month(y: int, m: int) -> tuple[int, int]:
    return _days(dt.date(y, m, 1), dt.date(y, m, calendar.monthrange(y, m)[1]))


def _add_months(d: dt.date, n: int) -> dt.date:
    idx = d.year * 12 + (d.month - 1) + n
    y, m = divmod(idx, 12)
    return dt.date(y, m + 1, min(d.day, calendar.monthrange(y, m + 1)[1]))


def _num(word: str) -> int:
    w = word.lower()
    return int(w) if w.isdigit() else _NUMBERS[w]


_SENTENCE_END = re.compile(r"[.!?]+\s+(?=[A-Z])|\n")
_DAY_OFFSETS = {"d-2": -2, "d-1": -1, "d0": 0, "d+1": 1}


def _sentence_at(text: str, pos: int) -> str:
    """The sentence around ``pos`` (an abbreviation's dot, as in "Apr. 2", does not end one)."""
    start, end = 0, len(text)
    for m in _SENTENCE_END.finditer(text):
        if m.end() <= pos:
            start = m.end()
        elif m.start() >= pos:
            end = m.start()
            break
    return text[start:end]


def _pick_year_for_day(month: int, day: int, today: dt.date, future: bool) -> dt.date | None:
    def make(y: int) -> dt.date | None:
        try:
            return dt.date(y, month, day)
        except ValueError:
            return None

    this = make(today.year)
    if future:
        if this is not None and this > today:
            return this
        return make(today.year + 1)
    if this is not None and this <= today:
        return this
    return make(today.year - 1)


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b"), "iso"),
    (re.compile(r"\bthe day before yesterday\b", re.I), "d-2"),
    (re.compile(r"\b(?:yesterday|last night)\b", re.I), "d-1"),
    (re.compile(r"\b(?:today|tonight|this (?:morning|afternoon|evening)|earlier today)\b", re.I), "d0"),
    (re.compile(r"\btomorrow\b", re.I), "d+1"),
    (re.compile(rf"\b({_NUM_RE})\s+(day|week|fortnight|month|year)s?\s+ago\b", re.I), "ago"),
    (re.compile(rf"\bin\s+({_NUM_RE})\s+(day|week|month|year)s?\b", re.I), "in"),
    (re.compile(r"\b(last|this|next|the)\s+weekend\b", re.I), "weekend"),
    (re.compile(rf"\b(last|this|next|on|since)\s+({_WD_RE})\b", re.I), "weekday"),
    (re.compile(r"\b(last|this|next)\s+(week|month|year)\b", re.I), "period"),
    (re.compile(rf"\b({_MONTH_RE})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}}))?", re.I), "md"),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MONTH_RE})\b\.?(?:,?\s+(\d{{4}}))?", re.I), "dm"),
    (re.compile(rf"\b(?:in|during|since|from|until|by|of|early|late|mid|mid-)\s+({_MONTH_RE})\b\.?(?:,?\s+(\d{{4}}))?", re.I),
     "month"),
    (re.compile(r"\b(?:in|since|back in|during|from|in the year|by|until)\s+((?:19|20|21)\d{2})\b", re.I), "year"),
]


def find_time_spans(text: str, now_ms: int) -> list[TimeSpan]:
    """Every time expression in ``text``, resolved against ``now_ms``, in text order.

    Overlapping matches keep the earliest-starting, then longest one.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if isinstance(now_ms, bool) or not isinstance(now_ms, int):
        raise TypeError(f"now_ms must be int milliseconds since the epoch, not {type(now_ms).__name__}")
    return _spans(text, time_matches(text), now_ms)


#: every pattern as one alternation: a text none of them matches (most queries) costs one scan,
#: not one per pattern. An alternation matches at a position exactly when one of its alternatives
#: does (the iso pattern, the only one without IGNORECASE, has no letters).
_ANY_TIME = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in _PATTERNS), re.I)


def time_matches(text: str) -> list[tuple[str, re.Match[str]]]:
    """The time expressions' pattern matches in ``text``, not yet resolved (they do not depend on
    the instant: :func:`query_time_range` and :func:`is_temporal_query` of one query share them)."""
    if _ANY_TIME.search(text) is None:
        return []
    return [(kind, m) for pattern, kind in _PATTERNS for m in pattern.finditer(text)]


def _spans(text: str, matches: list[tuple[str, re.Match[str]]], now_ms: int) -> list[TimeSpan]:
    """:func:`find_time_spans` of ``text`` from its :func:`time_matches`."""
    if not matches:
        return []
    today = dt.datetime.fromtimestamp(now_ms / 1000, tz=_UTC).date()
    found: list[tuple[int, int, TimeSpan]] = []
    for kind, m in matches:
        rng = _resolve(kind, m, text, today)
        if rng is not None:
            found.append((m.start(), -(m.end() - m.start()), TimeSpan(rng[0], rng[1], m.group(0), m.start())))
    found.sort(key=lambda x: (x[0], x[1]))
    out: list[TimeSpan] = []
    end = -1
    for start, neg_len, ts in found:
        if start >= end:
            out.append(ts)
            end = start - neg_len
    return out


def _resolve(kind: str, m: re.Match[str], text: str, today: dt.date) -> tuple[int, int] | None:
    g = m.groups()
    day = dt.timedelta(days=1)
    if kind == "iso":
        try:
            d = dt.date(int(g[0]), int(g[1]), int(g[2]))
        except ValueError:
            return None
        return _days(d, d)
    if kind in _DAY_OFFSETS:
        d = today + _DAY_OFFSETS[kind] * day
        return _days(d, d)
    if kind in ("ago", "in"):
        n, unit = _num(g[0]), g[1].lower()
        sign = -1 if kind == "ago" else 1
        if unit in ("day", "week", "fortnight"):
            d = today + sign * n * {"day": 1, "week": 7, "fortnight": 14}[unit] * day
        elif unit == "month":
            d = _add_months(today, sign * n)
        else:
            d = _add_months(today, sign * 12 * n)
        return _days(d, d)
    if kind == "weekend":
        which = g[0].lower()
        sat_this_week = today - today.weekday() * day + 5 * day
        if which == "last":
            sat = today - ((today.weekday() - 5) % 7 or 7) * day
        elif which == "next":
            sat = sat_this_week + 7 * day if today >= sat_this_week else sat_this_week
        elif which == "the" and _FUTURE.search(_sentence_at(text, m.start())) is None:
            sat = today - ((today.weekday() - 5) % 7 or 7) * day
        else:
            sat = sat_this_week
        return _days(sat, sat + day)
    if kind == "weekday":
        which, wd = g[0].lower(), _WEEKDAYS[g[1].lower()]
        if which == "on":
            which = "next" if _FUTURE.search(_sentence_at(text, m.start())) else "last"
        if which in ("last", "since"):
            d = today - ((today.weekday() - wd) % 7 or 7) * day
        elif which == "next":
            d = today + ((wd - today.weekday()) % 7 or 7) * day
        else:
            d = today + (wd - today.weekday()) * day
        return _days(d, d)
    if kind == "period":
        which, unit = g[0].lower(), g[1].lower()
        shift = {"last": -1, "this": 0, "next": 1}[which]
        if unit == "week":
            mon = today - today.weekday() * day + shift * 7 * day
            return _days(mon, mon + 6 * day)
        if unit == "month":
            first = _add_months(today.replace(day=1), shift)
            return _month(first.year, first.month)
        y = today.year + shift
        return _days(dt.date(y, 1, 1), dt.date(y, 12, 31))
    if kind in ("md", "dm"):
        mon_s, day_s = (g[0], g[1]) if kind == "md" else (g[1], g[0])
        month, dnum = _MONTHS[mon_s.lower().rstrip(".")], int(day_s)
        if g[2] is not None:
            y = int(g[2])
            if not (_YEAR_MIN <= y <= _YEAR_MAX):
                return None
            try:
                d = dt.date(y, month, dnum)
            except ValueError:
                return None
        else:
            picked = _pick_year_for_day(month, dnum, today, _FUTURE.search(_sentence_at(text, m.start())) is not None)
            if picked is None:
                return None
            d = picked
        return _days(d, d)
    if kind == "month":
        month = _MONTHS[g[0].lower().rstrip(".")]
        if g[0].lower() == "may" and g[1] is None:
            # "may" is mostly the verb: only "in May" / "during May" / "since May" count
            if not re.match(r"(?:in|during|since)\s", m.group(0), re.I):
                return None
        if g[1] is not None:
            y = int(g[1])
            if not (_YEAR_MIN <= y <= _YEAR_MAX):
                return None
        elif _FUTURE.search(_sentence_at(text, m.start())):
            y = today.year if month > today.month else today.year + 1
        else:
            y = today.year if month <= today.month else today.year - 1
        return _month(y, month)
    if kind == "year":
        y = int(g[0])
        return _days(dt.date(y, 1, 1), dt.date(y, 12, 31))
    raise AssertionError(kind)


def resolve_event_time(text: str, now_ms: int) -> int | None:
    """When what ``text`` tells happened: the start (UTC ms) of its first time expression's span,
    resolved against ``now_ms`` (the remember time). ``None`` when the text names no time."""
    spans = find_time_spans(text, now_ms)
    return spans[0].start_ms if spans else None


def query_time_range(query: str, now_ms: int,
                     matches: list[tuple[str, re.Match[str]]] | None = None) -> tuple[int, int] | None:
    """The inclusive range a question's time words cover (the union of its spans), or ``None``
    (``matches``: the query's :func:`time_matches`, when the caller has them)."""
    spans = find_time_spans(query, now_ms) if matches is None else _spans(query, matches, now_ms)
    if not spans:
        return None
    return min(s.start_ms for s in spans), max(s.end_ms for s in spans)


_WHEN = re.compile(r"^\s*(?:when\b|what (?:date|day|time|year|month)\b|on what (?:date|day)\b|how long ago\b|"
                   r"which (?:day|date|year|month)\b)", re.I)


def is_temporal_query(query: str, matches: list[tuple[str, re.Match[str]]] | None = None) -> bool:
    """A question about time: it asks *when* ("When did…", "What day…"), or names a time span
    (``matches``: the query's :func:`time_matches`, when the caller has them)."""
    if _WHEN.search(query):
        return True
    return bool(find_time_spans(query, 0) if matches is None else _spans(query, matches, 0))
