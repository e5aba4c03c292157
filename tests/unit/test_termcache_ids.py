"""The keyword cache file's row ids (``SavedIds``): compared as one text at open, split only
when iterated; a dead row (None) never compares equal to a live id list."""

import pytest

from umi.storage._termcache import SavedIds


def test_ids_split_when_iterated_with_dead_rows_as_none() -> None:
    ids = SavedIds("a\x00\x00c", 3)
    assert len(ids) == 3 and list(ids) == ["a", None, "c"] and ids[1] is None and ids[2] == "c"


def test_same_as_needs_the_same_ids_in_the_same_order_and_no_dead_row() -> None:
    ids = SavedIds("e1\x00e2\x00e3", 3)
    assert ids.same_as(["e1", "e2", "e3"]) and ids == ["e1", "e2", "e3"]
    assert not ids.same_as(["e2", "e1", "e3"]) and not ids.same_as(["e1", "e2"])
    assert not ids.same_as(["e1\x00e2", "e3", ""])  # same text, other rows: the count differs first
    dead = SavedIds("e1\x00\x00e3", 3)
    assert not dead.same_as(["e1", "", "e3"]) and dead != ["e1", "", "e3"]
    for text in ("\x00e2\x00e3", "e1\x00e2\x00"):  # a dead first or last row
        assert not SavedIds(text, 3).same_as(["", "e2", "e3"] if text[0] == "\x00" else ["e1", "e2", ""])


def test_empty_and_inconsistent_texts() -> None:
    assert list(SavedIds("", 0)) == [] and SavedIds("", 0).same_as([])
    with pytest.raises(ValueError):
        SavedIds("a", 2)  # one id where two were saved: the file is refused
    with pytest.raises(ValueError):
        SavedIds("a\x00b", 1)
