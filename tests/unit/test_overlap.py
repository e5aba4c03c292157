"""beside(): the keyword kernel runs on a helper thread while the caller walks the vector index;
the caller gets both answers, never returns while the helper still reads, and sees its errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from umi.storage import _overlap
from umi.storage._overlap import beside


@pytest.fixture(autouse=True)
def idle_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "_core_idle", lambda: True)  # the machine running the tests may be busy


def test_side_runs_on_the_helper_thread_while_main_runs_here() -> None:
    started = threading.Event()

    def side() -> str:
        started.set()
        return threading.current_thread().name

    def main() -> str:
        assert started.wait(10)  # the side started while main was still running
        return threading.current_thread().name

    side_thread, main_thread = beside(side, main)
    assert main_thread == threading.current_thread().name
    assert side_thread.startswith("umi-search")


def test_side_not_started_when_main_is_done_runs_here() -> None:
    gate = threading.Event()
    blocker = threading.Thread(target=lambda: beside(lambda: gate.wait(10), lambda: None))
    blocker.start()  # occupies the one helper thread
    time.sleep(0.05)
    try:
        side_thread, _ = beside(lambda: threading.current_thread().name, lambda: None)
        assert side_thread == threading.current_thread().name
    finally:
        gate.set()
        blocker.join(10)


def test_an_error_on_either_side_reaches_the_caller_after_the_side_is_done() -> None:
    with pytest.raises(KeyError, match="side"):
        beside(lambda: {}["side"], lambda: 1)
    started, done = threading.Event(), threading.Event()

    def slow_side() -> None:
        started.set()
        time.sleep(0.05)
        done.set()

    def failing_main() -> None:
        assert started.wait(10)  # the helper has started the side (no race with a sleep)
        raise ValueError("main")

    with pytest.raises(ValueError, match="main"):
        beside(slow_side, failing_main)
    assert done.is_set()  # the caller waited for the side before raising


def test_with_no_idle_core_both_run_here_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_overlap, "_core_idle", lambda: False)
    order: list[str] = []
    here = threading.current_thread().name
    got = beside(lambda: order.append("side") or threading.current_thread().name,
                 lambda: order.append("main") or threading.current_thread().name)
    assert got == (here, here) and order == ["side", "main"]


def test_the_load_average_decides_whether_a_core_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real _core_idle
    monkeypatch.setattr(_overlap, "_cores", 2)
    for load, idle in ((0.4, True), (1.4, True), (1.6, False), (6.0, False)):
        monkeypatch.setattr(_overlap, "_idle_core", (-2.0, True))  # read again
        monkeypatch.setattr(_overlap.os, "getloadavg", lambda load=load: (load, load, load))
        assert _overlap._core_idle() is idle
    monkeypatch.setattr(_overlap, "_cores", 1)
    monkeypatch.setattr(_overlap, "_idle_core", (-2.0, True))
    assert _overlap._core_idle() is False  # one core: nothing to overlap with


def test_a_store_searching_both_at_once_answers_as_the_two_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from umi.storage import _hotcache
    from umi.storage.sim import SimStorageBackend
    from umi.types import Entity

    ran_on: list[str] = []
    real = _overlap.beside

    def watched(side, main):  # type: ignore[no-untyped-def]
        def side_seen():  # type: ignore[no-untyped-def]
            ran_on.append(threading.current_thread().name)
            return side()
        return real(side_seen, main)

    monkeypatch.setattr(_hotcache, "OVERLAP_POSTINGS_MIN", 0)  # overlap even this small store
    monkeypatch.setattr(_hotcache, "beside", watched)
    rng = np.random.default_rng(3)
    store = SimStorageBackend(seed=0)
    words = ["apple", "pear", "plum", "fig", "kiwi"]
    store.upsert([Entity("note", f"n{i}", " ".join(rng.choice(words, 3)), embedding=rng.standard_normal(8).astype(np.float32))
                  for i in range(200)])
    qs = ["apple pear", "fig", "kiwi plum apple"]
    vs = [rng.standard_normal(8).astype(np.float32) for _ in qs]
    for at in ([0], [0, 1, 2]):
        got = store.search_content([qs[i] for i in at], [vs[i] for i in at], 7)
        assert got == [(store.search_vector(vs[i], 7), store.search_text(qs[i], 7)) for i in at]
    assert ran_on and all(name.startswith("umi-search") or name == threading.current_thread().name for name in ran_on)


class _ForcedOverlap:
    """Forces, once per :meth:`arm`, the interleaving the shared helper thread makes possible
    (no chance involved): the first search of store 0 runs its keyword side on the helper and
    holds it there; meanwhile the first search of store 1 starts, queues its side behind it,
    finishes its vector side and takes its keyword side back to run it itself; only then is the
    helper let go. Every other search runs as it comes. ``which.store``: the store the current
    thread searches (set by :meth:`mark`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from umi.storage import _hotcache

        self.which = threading.local()
        self._lock = threading.Lock()
        self._real = _overlap.beside
        self.arm()
        monkeypatch.setattr(_hotcache, "beside", self._beside)

    def arm(self) -> None:
        self.helper_busy, self.taken_back = threading.Event(), threading.Event()
        self.roles: dict[str, str] = {}  # role -> the thread its keyword side ran on
        self._claimed: set[int] = set()

    def mark(self, monkeypatch: pytest.MonkeyPatch, store: object, index: int) -> None:
        real = store.search_content  # type: ignore[attr-defined]

        def marked(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.which.store = index
            try:
                return real(*args, **kwargs)
            finally:
                self.which.store = None

        monkeypatch.setattr(store, "search_content", marked)

    def _beside(self, side, main):  # type: ignore[no-untyped-def]
        store = getattr(self.which, "store", None)
        with self._lock:
            role = None if store is None or store in self._claimed else ("held", "taker")[store]
            if role is not None:
                self._claimed.add(store)
        if role is None:
            return self._real(side, main)

        def seen_side():  # type: ignore[no-untyped-def]
            self.roles[role] = threading.current_thread().name
            if role == "held":
                self.helper_busy.set()
                assert self.taken_back.wait(30)  # the other store's search runs meanwhile
            return side()

        if role == "held":
            def held_main():  # type: ignore[no-untyped-def]
                assert self.helper_busy.wait(30)  # the helper has started this side: it is busy
                return main()

            return self._real(seen_side, held_main)
        assert self.helper_busy.wait(30)
        try:
            return self._real(seen_side, main)
        finally:
            self.taken_back.set()

    def check(self) -> None:
        """The forced interleaving happened."""
        here = threading.current_thread().name
        assert self.roles["held"].startswith("umi-search"), self.roles  # on the helper
        assert not self.roles["taker"].startswith("umi-search") and self.roles["taker"] != here, self.roles


def test_recalls_from_several_threads_at_once_answer_as_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stores share the one helper thread: recalls racing for it (each store's from two
    threads, both stores at once) get each their own answers — the same ids, scores and order as
    the same recalls made one at a time. The race is forced (:class:`_ForcedOverlap`): one store's
    keyword side holds the helper while the other store's search queues its side, takes it back
    and runs it on its own thread."""
    from concurrent.futures import ThreadPoolExecutor

    import umi
    from umi import RecallOptions
    from umi.storage import _hotcache
    from umi.storage.sim import SimStorageBackend
    from umi.types import Entity

    monkeypatch.setattr(_hotcache, "OVERLAP_POSTINGS_MIN", 0)  # overlap even these small stores
    emb = umi.SimEmbeddingProvider(5, 16)
    words = "apple pear plum fig kiwi lime date melon berry grape".split()
    mems = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        texts = [" ".join(rng.choice(words, 4)) + f" item{i}" for i in range(300)]
        store = SimStorageBackend(seed=seed)
        store.upsert([Entity("note", f"n{i}", t, embedding=v) for i, (t, v) in enumerate(zip(texts, emb.embed(texts)))])
        mems.append(umi.Memory(storage=store, embedder=emb))
    queries = [f"{a} {b}" for a in words[:6] for b in words[4:]]
    opts = RecallOptions(limit=8, deep_search=False)

    def answers(m: umi.Memory, qs: list[str]) -> list[list[tuple[str, float | None]]]:
        return [[(e.id, e.score) for e in m.recall_sync(q, opts)] for q in qs]

    try:
        alone = [answers(m, queries) for m in mems]
        assert all(any(a) for a in alone)
        forced = _ForcedOverlap(monkeypatch)
        for i, m in enumerate(mems):
            forced.mark(monkeypatch, m.storage, i)
        jobs = [(w, m) for m in (0, 1) for w in (0, 1)]  # each store from two threads
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: answers(mems[j[1]], queries[::1 - 2 * j[0]]), jobs))
        forced.check()
        for (w, m), ans in zip(jobs, got):
            assert ans == (alone[m] if w == 0 else alone[m][::-1])
        # and the storage reads themselves, racing with no loop between them (forced again)
        store_qs = [(q, emb.embed([q], kind="query")[0]) for q in queries]
        want = [[m.storage.search_content([q], [v], 9) for q, v in store_qs] for m in mems]
        forced.arm()
        with ThreadPoolExecutor(4) as pool:
            raced = list(pool.map(lambda j: [mems[j % 2].storage.search_content([q], [v], 9) for q, v in store_qs],
                                  range(4)))
        forced.check()
        assert all(r == want[j % 2] for j, r in enumerate(raced))
    finally:
        for m in mems:
            m.close()
