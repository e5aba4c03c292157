"""WorkingMemory: values, TTLs on a fake clock, limits, errors, eviction, accounting."""

from __future__ import annotations

import math

import pytest

import umi
from umi.working_memory import (
    WORKING_MEMORY_KEY_BYTES_MAX,
    WORKING_MEMORY_TTL_SECS_MAX,
    WORKING_MEMORY_VALUE_BYTES_MAX,
)

KIB = 1024
DAY = 24 * 3600.0


class FakeClock:
    """A clock the test moves by hand; it never sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def tick(self, secs: float) -> None:
        self.now += secs


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kw) -> umi.WorkingMemory:
    return umi.WorkingMemory(clock=clock, **kw)


def snapshot(wm: umi.WorkingMemory) -> tuple:
    keys = wm.keys()
    return (keys, [wm.ttl(k) for k in keys], wm.used_bytes)


def test_usage_example(clock):
    wm = make(clock)
    wm.set("session_id", b"abc123")
    wm.set("prefs", b'{"theme": "dark"}', ttl_secs=60)
    assert wm.get("session_id") == b"abc123"
    assert wm.get("prefs") == b'{"theme": "dark"}'
    clock.tick(59.5)
    assert wm.get("prefs") == b'{"theme": "dark"}'
    clock.tick(0.5)  # exactly at expiry: gone
    assert wm.get("prefs") is None
    assert "prefs" not in wm
    assert wm.get("session_id") == b"abc123"
    assert wm.keys() == ["session_id"]
    assert len(wm) == 1


# --- values ----------------------------------------------------------------------


def test_set_get_replace_delete(clock):
    wm = make(clock)
    assert wm.get("k") is None
    wm.set("k", b"v1")
    assert wm.get("k") == b"v1"
    wm.set("k", b"value two")
    assert wm.get("k") == b"value two"
    assert wm.used_bytes == 1 + 9
    assert wm.delete("k") is True
    assert wm.delete("k") is False
    assert wm.get("k") is None
    assert wm.used_bytes == 0


def test_empty_and_binary_values(clock):
    wm = make(clock)
    wm.set("empty", b"")
    wm.set("bin", bytes(range(256)))
    assert wm.get("empty") == b""
    assert wm.get("bin") == bytes(range(256))
    assert wm.used_bytes == 5 + 3 + 256


def test_bytes_subclass_value(clock):
    class B(bytes):
        pass

    wm = make(clock)
    wm.set("k", B(b"xyz"))
    assert type(wm.get("k")) is bytes and wm.get("k") == b"xyz"


def test_replace_restarts_ttl(clock):
    wm = make(clock, default_ttl_secs=10)
    wm.set("k", b"a")
    clock.tick(8)
    assert wm.ttl("k") == 2
    wm.set("k", b"b")
    assert wm.ttl("k") == 10
    clock.tick(9)
    assert wm.get("k") == b"b"


def test_ttl_and_touch(clock):
    wm = make(clock, default_ttl_secs=100)
    assert wm.ttl("k") is None
    assert wm.touch("k") is False
    wm.set("k", b"v", ttl_secs=5)
    assert wm.ttl("k") == 5
    clock.tick(2)
    assert wm.ttl("k") == 3
    assert wm.touch("k", ttl_secs=50) is True
    assert wm.ttl("k") == 50
    assert wm.touch("k") is True
    assert wm.ttl("k") == 100
    clock.tick(100)
    assert wm.ttl("k") is None
    assert wm.touch("k") is False


def test_expired_value_is_never_returned(clock):
    wm = make(clock)
    wm.set("k", b"v", ttl_secs=1)
    clock.tick(1)
    assert wm.get("k") is None
    assert wm.ttl("k") is None
    assert wm.touch("k") is False
    assert wm.delete("k") is False
    assert wm.keys() == []
    assert len(wm) == 0
    assert wm.used_bytes == 0


def test_expire_returns_count(clock):
    wm = make(clock)
    for i in range(5):
        wm.set(f"short{i}", b"x", ttl_secs=1 + i)
    wm.set("long", b"x", ttl_secs=100)
    assert wm.expire() == 0
    clock.tick(2.5)  # short0 (1 s) and short1 (2 s) are due
    assert wm.expire() == 2
    assert wm.expire() == 0
    assert sorted(wm.keys()) == ["long", "short2", "short3", "short4"]
    clock.tick(10)
    assert wm.expire() == 3
    assert wm.keys() == ["long"]


def test_keys_in_lru_order(clock):
    wm = make(clock)
    for k in ["a", "b", "c", "d"]:
        wm.set(k, b"v")
    assert wm.keys() == ["a", "b", "c", "d"]
    wm.get("a")
    wm.touch("b")
    wm.set("c", b"new")
    assert wm.keys() == ["d", "a", "b", "c"]
    wm.ttl("d")  # reads don't count as use
    assert "d" in wm
    assert wm.keys() == ["d", "a", "b", "c"]
    assert list(wm) == ["d", "a", "b", "c"]


def test_clear(clock):
    wm = make(clock)
    for i in range(100):
        wm.set(f"k{i}", b"v" * i)
    wm.clear()
    assert len(wm) == 0 and wm.used_bytes == 0 and wm.keys() == []
    wm.set("k", b"v")
    assert wm.get("k") == b"v"


def test_contains(clock):
    wm = make(clock)
    wm.set("k", b"v")
    assert "k" in wm
    assert "x" not in wm
    assert "" not in wm
    assert "x" * 300 not in wm
    assert "\ud800" not in wm
    with pytest.raises(TypeError):
        _ = b"k" in wm


def test_keys_differing_after_nul(clock):
    wm = make(clock)
    wm.set("a\x00b", b"1")
    wm.set("a\x00c", b"2")
    wm.set("a", b"3")
    assert (wm.get("a\x00b"), wm.get("a\x00c"), wm.get("a")) == (b"1", b"2", b"3")
    assert wm.used_bytes == 3 + 1 + 3 + 1 + 1 + 1


def test_multibyte_keys_accounting(clock):
    wm = make(clock)
    wm.set("é", b"12")
    wm.set("😀", b"")
    wm.set("日本", b"abc")
    assert wm.used_bytes == (2 + 2) + (4 + 0) + (6 + 3)
    assert wm.get("日本") == b"abc"
    assert sorted(wm.keys()) == sorted(["é", "😀", "日本"])


def test_repr(clock):
    wm = make(clock, max_entries=5, on_full="evict_lru")
    wm.set("k", b"vv")
    assert repr(wm) == (
        "WorkingMemory(entries=1, used_bytes=3, max_bytes=1048576, max_entries=5, "
        "on_full='evict_lru')"
    )


# --- incr --------------------------------------------------------------------------


def test_incr(clock):
    wm = make(clock, default_ttl_secs=30)
    assert wm.incr("n") == 1
    assert wm.get("n") == b"1"
    assert wm.ttl("n") == 30
    assert wm.incr("n", 41) == 42
    assert wm.incr("n", -50) == -8
    assert wm.get("n") == b"-8"
    wm.set("m", b"007", ttl_secs=5)
    clock.tick(2)
    assert wm.incr("m") == 8
    assert wm.ttl("m") == 3  # incr keeps the TTL
    assert wm.incr("zero", 0) == 0
    assert wm.used_bytes == (1 + 2) + (1 + 1) + (4 + 1)


def test_incr_int64_edges(clock):
    wm = make(clock)
    big = 2**63 - 1
    wm.set("n", str(big - 1).encode())
    assert wm.incr("n") == big
    with pytest.raises(umi.NotAnIntegerError) as info:
        wm.incr("n")
    assert "64-bit" in str(info.value) and info.value.key == "n"
    assert wm.get("n") == str(big).encode()
    wm.set("m", str(-(2**63)).encode())
    assert wm.incr("m", 0) == -(2**63)
    with pytest.raises(umi.NotAnIntegerError):
        wm.incr("m", -1)
    with pytest.raises(umi.NotAnIntegerError):
        wm.incr("m", 2**63)
    wm.set("o", b"9223372036854775808")
    with pytest.raises(umi.NotAnIntegerError):
        wm.incr("o")


@pytest.mark.parametrize(
    "value", [b"", b"-", b"1.5", b" 1", b"1 ", b"+1", b"0x10", b"abc", b"\xff", "١".encode()]
)
def test_incr_non_integer(clock, value):
    wm = make(clock)
    wm.set("n", value)
    with pytest.raises(umi.NotAnIntegerError) as info:
        wm.incr("n")
    assert isinstance(info.value, umi.ValidationError)
    assert wm.get("n") == value


def test_incr_types(clock):
    wm = make(clock)
    with pytest.raises(TypeError):
        wm.incr("n", 1.0)
    with pytest.raises(TypeError):
        wm.incr("n", True)
    assert "n" not in wm


def test_incr_respects_budget(clock):
    wm = make(clock, max_bytes=KIB, max_entries=2)
    wm.set("a", b"9" * 1000)
    wm.set("n", b"9" * 21)  # 1 + 21 bytes: 1022 used
    with pytest.raises(umi.NotAnIntegerError):
        wm.incr("n")
    wm.set("n", b"99")  # 1003 used
    assert wm.incr("n", -90) == 9  # shrinks
    with pytest.raises(umi.WorkingMemoryFullError) as info:
        wm.incr("new")  # a third entry
    assert info.value.limit == 2
    assert wm.keys() == ["a", "n"]


# --- limits -------------------------------------------------------------------------


def test_key_limits(clock):
    wm = make(clock)
    wm.set("k" * 256, b"v")
    wm.set("é" * 128, b"v")  # 256 bytes
    assert wm.get("k" * 256) == b"v"
    for bad, nbytes in [("k" * 257, 257), ("é" * 129, 258), ("", 0)]:
        with pytest.raises(umi.InvalidKeyError) as info:
            wm.set(bad, b"v")
        assert info.value.key == bad
        assert f"1-{WORKING_MEMORY_KEY_BYTES_MAX} UTF-8 bytes" in str(info.value)
        assert f"got {nbytes} bytes" in str(info.value)
        with pytest.raises(umi.InvalidKeyError):
            wm.get(bad)
        with pytest.raises(umi.InvalidKeyError):
            wm.delete(bad)
        with pytest.raises(umi.InvalidKeyError):
            wm.incr(bad)
        with pytest.raises(umi.InvalidKeyError):
            wm.ttl(bad)
        with pytest.raises(umi.InvalidKeyError):
            wm.touch(bad)
    with pytest.raises(umi.InvalidKeyError) as info:
        wm.set("bad\ud800", b"v")
    assert "UTF-8" in str(info.value)
    assert len(wm) == 2


def test_value_limit(clock):
    wm = make(clock)
    wm.set("k", b"x" * WORKING_MEMORY_VALUE_BYTES_MAX)
    assert wm.used_bytes == 1 + 65536
    with pytest.raises(umi.ValueTooLargeError) as info:
        wm.set("k2", b"x" * (WORKING_MEMORY_VALUE_BYTES_MAX + 1))
    assert (info.value.limit, info.value.actual) == (65536, 65537)
    assert "65537 bytes" in str(info.value) and "65536 bytes" in str(info.value)
    assert wm.keys() == ["k"]


def test_ttl_limits(clock):
    wm = make(clock)
    wm.set("max", b"v", ttl_secs=7 * DAY)
    wm.set("int", b"v", ttl_secs=5)
    wm.set("tiny", b"v", ttl_secs=1e-9)
    assert wm.ttl("max") == 7 * DAY
    assert WORKING_MEMORY_TTL_SECS_MAX == 7 * DAY
    for bad in [7 * DAY + 0.001, 0, 0.0, -1, math.nan, math.inf]:
        with pytest.raises(umi.InvalidTTLError) as info:
            wm.set("k", b"v", ttl_secs=bad)
        assert info.value.limit == 7 * DAY
        assert info.value.actual is bad
        assert "604800" in str(info.value)
        with pytest.raises(umi.InvalidTTLError):
            wm.touch("max", ttl_secs=bad)
    assert "k" not in wm
    assert wm.ttl("max") == 7 * DAY


def test_wrong_types(clock):
    wm = make(clock)
    with pytest.raises(TypeError):
        wm.set(b"k", b"v")
    with pytest.raises(TypeError):
        wm.set("k", "v")
    with pytest.raises(TypeError):
        wm.set("k", bytearray(b"v"))
    with pytest.raises(TypeError):
        wm.set("k", b"v", ttl_secs="10")
    with pytest.raises(TypeError):
        wm.set("k", b"v", ttl_secs=True)
    with pytest.raises(TypeError):
        wm.get(1)
    assert len(wm) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_bytes": 1023}, "max_bytes"),
        ({"max_bytes": (1 << 30) + 1}, "max_bytes"),
        ({"max_entries": 0}, "max_entries"),
        ({"default_ttl_secs": 0}, "default_ttl_secs"),
        ({"default_ttl_secs": 7 * DAY + 1}, "default_ttl_secs"),
        ({"on_full": "drop"}, "on_full"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(umi.InvalidConfigError) as info:
        umi.WorkingMemory(**kwargs)
    assert message in str(info.value)


def test_config_boundaries_and_types():
    assert umi.WorkingMemory(max_bytes=KIB).max_bytes == KIB
    assert umi.WorkingMemory(max_bytes=1 << 30).max_bytes == 1 << 30
    wm = umi.WorkingMemory(max_entries=1, default_ttl_secs=7 * DAY, on_full="evict_lru")
    assert (wm.max_entries, wm.default_ttl_secs, wm.on_full) == (1, 7 * DAY, "evict_lru")
    assert umi.WorkingMemory().on_full == "error"
    with pytest.raises(TypeError):
        umi.WorkingMemory(max_bytes=1.5)
    with pytest.raises(TypeError):
        umi.WorkingMemory(on_full=None)
    with pytest.raises(TypeError):
        umi.WorkingMemory(clock=123.0)


def test_bad_clock_results():
    wm = umi.WorkingMemory(clock=lambda: "now")
    with pytest.raises(TypeError):
        wm.set("k", b"v")
    wm = umi.WorkingMemory(clock=lambda: math.nan)
    with pytest.raises(umi.InvalidConfigError):
        wm.get("k")
    wm = umi.WorkingMemory(clock=lambda: 5)  # ints are seconds too
    wm.set("k", b"v", ttl_secs=1)
    assert wm.ttl("k") == 1


def test_clock_read_once_per_operation(clock):
    wm = make(clock)
    wm.set("k", b"v")
    wm.get("k")
    wm.incr("n")
    wm.touch("k")
    assert clock.reads == 4


def test_default_clock_is_monotonic_seconds():
    wm = umi.WorkingMemory(default_ttl_secs=60)
    wm.set("k", b"v")
    assert wm.get("k") == b"v"
    left = wm.ttl("k")
    assert left is not None and 59 < left <= 60


# --- budgets: error mode ----------------------------------------------------------


def test_bytes_full_error_changes_nothing(clock):
    wm = make(clock, max_bytes=KIB)
    wm.set("a", b"x" * 500)  # 501
    wm.set("b", b"y" * 522)  # 523 -> 1024 exactly
    assert wm.used_bytes == KIB
    before = snapshot(wm)
    with pytest.raises(umi.WorkingMemoryFullError) as info:
        wm.set("c", b"")
    err = info.value
    assert (err.over_by, err.limit, err.key) == (1, KIB, "c")
    assert "max_bytes=1024" in str(err)
    with pytest.raises(umi.WorkingMemoryFullError) as info:
        wm.set("a", b"x" * 501)  # replacement one byte bigger
    assert info.value.over_by == 1
    assert snapshot(wm) == before
    assert wm.get("a") == b"x" * 500
    wm.set("a", b"z" * 500)  # same size: fine
    assert wm.used_bytes == KIB


def test_entries_full_error(clock):
    wm = make(clock, max_entries=3)
    for k in "abc":
        wm.set(k, b"v")
    before = snapshot(wm)
    with pytest.raises(umi.WorkingMemoryFullError) as info:
        wm.set("d", b"v")
    assert (info.value.over_by, info.value.limit, info.value.key) == (1, 3, "d")
    assert "max_entries=3" in str(info.value)
    assert snapshot(wm) == before
    wm.set("a", b"replace is fine")
    assert len(wm) == 3


def test_entry_larger_than_budget_refused_in_both_modes(clock):
    for mode in ("error", "evict_lru"):
        wm = make(clock, max_bytes=KIB, on_full=mode)
        wm.set("keep", b"v")
        with pytest.raises(umi.WorkingMemoryFullError) as info:
            wm.set("big", b"x" * 2000)
        assert (info.value.over_by, info.value.limit) == (3 + 2000 - KIB, KIB)
        assert wm.keys() == ["keep"]


def test_expired_entries_reclaimed_before_refusing(clock):
    wm = make(clock, max_bytes=KIB, max_entries=2)
    wm.set("a", b"x" * 600, ttl_secs=1)
    wm.set("b", b"y" * 10, ttl_secs=1)
    clock.tick(1)
    assert wm.used_bytes == 612  # nothing has looked since
    wm.set("c", b"z" * 1000)  # fits once a and b are reclaimed
    wm.set("d", b"")
    assert sorted(wm.keys()) == ["c", "d"]
    assert wm.used_bytes == 1001 + 1


# --- budgets: evict_lru mode ---------------------------------------------------------


def test_evict_lru_by_bytes(clock):
    wm = make(clock, max_bytes=KIB, on_full="evict_lru")
    for k in "abcd":
        wm.set(k, b"x" * 249)  # 250 each -> 1000
    wm.get("a")  # a is now most recent; b is least
    wm.set("e", b"y" * 99)  # 100 more: evict b only
    assert wm.keys() == ["c", "d", "a", "e"]
    assert wm.used_bytes == 850
    wm.set("f", b"z" * 499)  # 500 more: evict c and d
    assert wm.keys() == ["a", "e", "f"]
    assert wm.used_bytes <= KIB


def test_evict_lru_by_entries_and_touch_counts(clock):
    wm = make(clock, max_entries=3, on_full="evict_lru")
    for k in "abc":
        wm.set(k, b"v")
    wm.touch("a")
    wm.set("d", b"v")
    assert wm.keys() == ["c", "a", "d"]


def test_evict_lru_replacement_never_evicts_itself(clock):
    wm = make(clock, max_bytes=KIB, on_full="evict_lru")
    wm.set("a", b"x" * 500)
    wm.set("b", b"y" * 400)
    # a is least recently used, but it is the entry being replaced.
    wm.set("a", b"z" * 700)
    assert wm.keys() == ["a"]
    assert wm.get("a") == b"z" * 700


def test_evict_prefers_expired(clock):
    wm = make(clock, max_entries=2, on_full="evict_lru")
    wm.set("old", b"v", ttl_secs=100)
    wm.set("soon", b"v", ttl_secs=1)
    clock.tick(1)
    wm.set("new", b"v")
    assert wm.keys() == ["old", "new"]


def test_heavy_churn_keeps_accounting(clock):
    wm = make(clock, max_bytes=64 * KIB, max_entries=500, on_full="evict_lru")
    expected: dict[str, bytes] = {}
    for i in range(20000):
        k = f"key{(i * 7919) % 900}"
        v = bytes([i % 251]) * ((i * 31) % 300)
        wm.set(k, v, ttl_secs=1 + (i % 50))
        expected[k] = v
        if i % 100 == 0:
            clock.tick(0.5)
        assert wm.used_bytes <= 64 * KIB
    live = wm.keys()
    assert len(live) <= 500
    assert wm.used_bytes == sum(len(k.encode()) + len(expected[k]) for k in live)
    for k in live:
        assert wm.get(k) == expected[k]


def test_clock_stepping_backwards_keeps_expiry_consistent(clock):
    wm = make(clock)
    wm.set("k", b"v", ttl_secs=10)  # expires at 1010
    clock.tick(-500)  # a skewed clock: now 500
    assert wm.ttl("k") == 510
    wm.set("soon", b"v", ttl_secs=5)  # expires at 505
    wm.touch("k", ttl_secs=1)  # moves k's expiry earlier, to 501
    clock.tick(2)
    assert wm.keys() == ["soon"]
    clock.tick(4)
    assert wm.keys() == []


# --- hostile numbers (issue 14) -------------------------------------------------------

import pytest as _pytest  # noqa: E402

import umi as _umi  # noqa: E402


@_pytest.mark.parametrize("ttl", [10**400, -(10**400), 2**1024, float("nan"), float("inf"), -float("inf"),
                                  0, -1, 7 * 24 * 3600 + 1, 1e300])
def test_hostile_ttls_are_invalid_ttl_errors_and_change_nothing(ttl):
    wm = _umi.WorkingMemory(clock=lambda: 0.0)
    wm.set("k", b"v")
    before = (wm.keys(), wm.used_bytes, wm.ttl("k"))
    with _pytest.raises(_umi.InvalidTTLError):
        wm.set("k", b"other", ttl_secs=ttl)
    with _pytest.raises(_umi.InvalidTTLError):
        wm.set("new", b"x", ttl_secs=ttl)
    with _pytest.raises(_umi.InvalidTTLError):
        wm.touch("k", ttl_secs=ttl)
    assert (wm.keys(), wm.used_bytes, wm.ttl("k")) == before
    assert wm.get("k") == b"v"
    with _pytest.raises(_umi.InvalidConfigError):
        _umi.WorkingMemory(default_ttl_secs=ttl)


@_pytest.mark.parametrize("now", [10**400, 2**1024, float("nan"), float("inf"), -float("inf")])
def test_hostile_clock_readings_are_config_errors(now):
    reading = [0.0]
    wm = _umi.WorkingMemory(clock=lambda: reading[0])
    wm.set("k", b"v")
    reading[0] = now
    for op in (lambda: wm.get("k"), lambda: wm.set("k", b"w"), lambda: wm.keys(), lambda: len(wm),
               lambda: wm.incr("n"), lambda: wm.expire()):
        with _pytest.raises(_umi.InvalidConfigError):
            op()
    reading[0] = 0.0
    assert wm.get("k") == b"v" and wm.keys() == ["k"]


def test_a_clock_that_jumps_back_keeps_entries_consistent():
    reading = [1000.0]
    wm = _umi.WorkingMemory(clock=lambda: reading[0])
    wm.set("a", b"1", ttl_secs=10)
    reading[0] = -1e12  # skewed far into the past: nothing expires, ttl grows
    assert wm.get("a") == b"1" and wm.ttl("a") > 10
    reading[0] = 1011.0
    assert wm.get("a") is None and wm.used_bytes == 0
