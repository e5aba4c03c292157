"""Transaction nesting and error rules shared by the cache-backed backends (DuckDB, Sim).

A backend supplies ``_lock`` (an ``RLock``), ``_check_writable()`` and three hooks:
``_begin_tx()`` (start a transaction and the cache journal), ``_commit_tx(wrote)`` (make
it durable; bump the generation when ``wrote`` recorded a change) and ``_rollback_tx()`` (undo
everything, restoring the cache; must not raise). A ``_commit_tx`` that raises is rolled back here, and
its error re-raised as a :class:`~umi.StorageError` (chained).

Rules: a write outside :meth:`transaction` is its own transaction; nested use joins the
outer one; an exception inside rolls everything back and is re-raised, as a
:class:`~umi.StorageError` (chained) unless it already is a :class:`~umi.UmiError`. A
write that fails inside a transaction marks it rollback-only: even if the caller catches
the error, the transaction rolls back at its end and says so.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

from ..errors import StorageError, UmiError

__all__ = ["TransactionMixin", "raise_wrapped"]


def raise_wrapped(exc: BaseException, what: str) -> NoReturn:
    """The one error rule of a failed storage step (every backend's): a :class:`~umi.UmiError`, or
    a BaseException that is no Exception (KeyboardInterrupt), propagates as it is; any other error
    becomes a :class:`~umi.StorageError` ``"<what>: <type>: <message>"``, chained to it."""
    if isinstance(exc, UmiError) or not isinstance(exc, Exception):
        raise exc
    raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc


class TransactionMixin:
    _lock: threading.RLock
    _depth: int = 0  # 0: no transaction; n: n nested `transaction()` blocks (or 1 for a lone write)
    _wrote: bool = False  # something was written in the open transaction
    _rollback_only: bool = False  # a write failed inside the open transaction
    # the backend's hooks (see the module docstring)
    _check_writable: Callable[[], None]
    _begin_tx: Callable[[], None]
    _commit_tx: Callable[[bool], None]
    _rollback_tx: Callable[[], None]

    def _start(self) -> None:
        self._begin_tx()
        self._depth = 1
        self._wrote = False
        self._rollback_only = False

    def _finish(self, commit: bool) -> None:
        wrote = self._wrote
        self._depth = 0
        self._wrote = False
        self._rollback_only = False
        if not commit:
            self._rollback_tx()
            return
        try:
            self._commit_tx(wrote)
        except BaseException as exc:
            self._rollback_tx()
            raise_wrapped(exc, "commit failed and was rolled back")

    @contextmanager
    def _writing(self, op: str) -> Iterator[None]:
        """Wrap one write: joins an open transaction, else is its own."""
        with self._lock:
            self._check_writable()
            if self._depth:
                try:
                    yield
                except BaseException as exc:
                    self._rollback_only = True
                    raise_wrapped(exc, f"{op}() failed; the transaction will roll back")
                self._wrote = True
                return
            self._start()
            try:
                yield
            except BaseException as exc:
                self._finish(commit=False)
                raise_wrapped(exc, f"{op}() failed and was rolled back")
            self._wrote = True
            self._finish(commit=True)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside commits together, or nothing does. Nested use joins the
        outer transaction; an error anywhere inside rolls the whole of it back. Other threads
        wait for it to end (the backend's lock is held throughout)."""
        with self._lock:
            self._check_writable()
            if self._depth:
                self._depth += 1
                try:
                    yield
                except BaseException:
                    self._rollback_only = True
                    raise
                finally:
                    self._depth -= 1
                return
            self._start()
            try:
                yield
            except BaseException as exc:
                if self._depth:  # not already ended (e.g. by close() inside the block)
                    self._finish(commit=False)
                raise_wrapped(exc, "transaction rolled back")
            if not self._depth:
                raise StorageError("the store was closed inside the transaction; it was rolled back")
            if self._rollback_only:
                self._finish(commit=False)
                raise StorageError("transaction rolled back: a write inside it failed (and the error was caught)")
            self._finish(commit=True)
