"""Names of writable layers (``mount --rw --upper NAME``, ``run --name``) become directory
names under ``STORE/upper``: only a safe, portable set is taken."""

from __future__ import annotations

import pytest

from layerfs.errors import UsageError
from layerfs.fs.mount import validate_upper_name


@pytest.mark.parametrize("name", ["web", "a.b-c_1", "0", "x" * 128])
def test_names_taken(name: str) -> None:
    assert validate_upper_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "a/b", "..", "web\n", "we b", "x" * 129, "caf\u00e9"]
)
def test_names_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid upper name"):
        validate_upper_name(name)
