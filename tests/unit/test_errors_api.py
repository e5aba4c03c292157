"""The public surface: ``umi.__all__`` is exactly what umi exports, and the error tree holds."""

from __future__ import annotations

import inspect

import pytest

import umi
import umi.errors


def test_every_name_in_all_is_importable():
    for name in umi.__all__:
        assert hasattr(umi, name), name
    ns: dict[str, object] = {}
    exec("from umi import *", ns)  # noqa: S102 -- a star import is what is under test
    assert set(umi.__all__) <= set(ns)


def test_all_matches_public_names():
    # dir(), not vars(): most names resolve lazily on first use (umi.__getattr__)
    public = {
        name
        for name in dir(umi)
        if not name.startswith("_") and not inspect.ismodule(getattr(umi, name))
    }
    assert public == set(umi.__all__) - {"__version__"}
    assert len(umi.__all__) == len(set(umi.__all__)), "duplicates in umi.__all__"


def test_errors_all_matches_module_and_is_reexported():
    defined = {
        name
        for name, value in vars(umi.errors).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == "umi.errors"
    }
    assert defined == set(umi.errors.__all__)
    assert set(umi.errors.__all__) <= set(umi.__all__)


@pytest.mark.parametrize("name", umi.errors.__all__)
def test_every_error_is_an_umi_error(name):
    cls = getattr(umi, name)
    assert issubclass(cls, umi.UmiError)


def test_every_error_class_is_in_the_docstring_tree():
    for name in umi.errors.__all__:
        assert name in umi.errors.__doc__, name


@pytest.mark.parametrize(
    "name",
    [
        "InvalidKeyError",
        "ValueTooLargeError",
        "InvalidTTLError",
        "InvalidLabelError",
        "InvalidImportanceError",
        "InvalidConfigError",
        "NotAnIntegerError",
    ],
)
def test_arena_validation_errors_are_value_errors(name):
    cls = getattr(umi, name)
    assert issubclass(cls, umi.ValidationError) and issubclass(cls, ValueError)


def test_capacity_errors_carry_numbers():
    err = umi.WorkingMemoryFullError("full", over_by=3, limit=10, key="k")
    assert (err.over_by, err.limit, err.key) == (3, 10, "k")
    core = umi.CoreMemoryFullError("full", over_by=1, limit=1024)
    assert (core.over_by, core.limit) == (1, 1024)
    assert issubclass(umi.CoreMemoryFullError, umi.CapacityError)
    assert issubclass(umi.WorkingMemoryFullError, umi.CapacityError)


def test_arenas_are_exported():
    assert umi.CoreMemory.__module__ == "umi.core_memory"
    assert umi.WorkingMemory.__module__ == "umi.working_memory"
    assert "CoreMemory" in umi.__all__ and "WorkingMemory" in umi.__all__
