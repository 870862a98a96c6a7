"""External ids (recstack/ids.py): the documented mapping of client ids to int64."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from recstack.ids import (
    ID_LIMIT,
    KEY_MAX_CHARS,
    InvalidId,
    external_id,
    internal_id,
    key_hash,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def test_the_documented_example_is_what_the_code_computes() -> None:
    """docs/data.md gives a worked example of the hash; clients may compute it themselves,
    so it must stay stable across versions."""
    m = re.search(r"`(SKU-[^`]+)` → BLAKE2b-64 `([0-9a-f]{16})` → `([0-9]+)`", DOCS.read_text())
    assert m, "docs/data.md lost the worked hash example"
    key, digest, value = m.group(1), m.group(2), int(m.group(3))
    assert hashlib.blake2b(key.encode(), digest_size=8).hexdigest() == digest
    assert key_hash(key) == value == int(digest, 16) & (ID_LIMIT - 1)


@pytest.mark.parametrize(
    "key", ["SKU-1", "550e8400-e29b-41d4-a716-446655440000", "a", "x" * KEY_MAX_CHARS, "1_000"]
)
def test_keys_hash_into_int64(key: str) -> None:
    value = internal_id(key)
    assert value == key_hash(key) and 0 <= value < ID_LIMIT
    assert external_id(value, {value: key}) == key


@pytest.mark.parametrize(
    ("raw", "value"), [("0", 0), ("42", 42), ("007", 7), (str(ID_LIMIT - 1), ID_LIMIT - 1)]
)
def test_digit_strings_keep_their_integer_value(raw: str, value: int) -> None:
    assert internal_id(raw) == value
    assert external_id(value, {}) == str(value)  # integer ids answer their digits


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "empty"),
        (str(ID_LIMIT), "out of range"),
        ("1" * 20, "out of range"),
        ("x" * (KEY_MAX_CHARS + 1), "longer than 64"),
        ("a b", "A-Z a-z 0-9"),
        ("tab\there", "A-Z a-z 0-9"),
        ("nul\x00", "A-Z a-z 0-9"),
        ("café", "A-Z a-z 0-9"),
        ("a,b", "A-Z a-z 0-9"),  # commas separate HTTP lists
        ("-5", "not a signed or decimal number"),
        ("1.5", "not a signed or decimal number"),
        ("1e9", "not a signed or decimal number"),
        ("²", "A-Z a-z 0-9"),
    ],
)
def test_invalid_ids_say_why(raw: str, needle: str) -> None:
    with pytest.raises(InvalidId, match=re.escape(needle)):
        internal_id(raw, "user_id")
