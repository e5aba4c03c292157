"""beside(): the keyword kernel runs on a helper thread while the caller walks the vector index;
the caller gets both answers, never returns while the helper still reads, and sees its errors."""

from __future__ import annotations

import threading
import time

import pytest

from umi.storage._overlap import beside


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
    done = threading.Event()

    def slow_side() -> None:
        time.sleep(0.05)
        done.set()

    def failing_main() -> None:
        time.sleep(0.01)  # let the helper start the side
        raise ValueError("main")

    with pytest.raises(ValueError, match="main"):
        beside(slow_side, failing_main)
    assert done.is_set()  # the caller waited for the side before raising
