"""The one "same settings?" check that build, profile and active learning resume through, and the error classes."""
import pytest

from subcache.errors import (ConfigError, ForeignStoreError, IncompleteStoreError, StoreError, StoreExistsError,
                             SubcacheError)
from subcache.settings import changed_keys, require_same


def test_the_refusal_names_exactly_the_keys_that_differ():
    before = {"epochs": 1, "lr": 0.001, "layers": [6], "gone": 1}
    assert changed_keys(before, dict(before)) == []
    assert changed_keys(before, {"epochs": 2, "lr": 0.001, "layers": [6], "new": 0}) == ["epochs", "gone", "new"]
    assert changed_keys({"a": None}, {}) == ["a"]  # recorded as None is not the same as not recorded
    require_same(before, dict(before), "x", "y")  # the same: nothing raised
    with pytest.raises(ConfigError, match=r"^out holds a run with other settings \(epochs, layers differ\); use "
                                          r"another --out$"):
        require_same(before, {**before, "epochs": 2, "layers": [7]}, "out holds a run with other settings",
                     "use another --out")
    with pytest.raises(ForeignStoreError):
        require_same(None, {"a": 1}, "x", "y", ForeignStoreError)


def test_errors_have_the_built_in_parent_a_caller_would_catch():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, SubcacheError)
    for store_error in (StoreError, IncompleteStoreError, ForeignStoreError, StoreExistsError):
        assert issubclass(store_error, OSError) and issubclass(store_error, SubcacheError)
    assert issubclass(StoreExistsError, FileExistsError) and issubclass(ForeignStoreError, ValueError)
    assert str(StoreError("one line")) == "one line"
