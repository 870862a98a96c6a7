"""External ids (what clients send: integers, UUIDs, SKUs) and the int64 ids used inside.

Every id inside recstack is an int64 in ``[0, 2**63)`` (Feast join keys, tower inputs,
FAISS ids, the catalog). A client's id is a string mapped at the edges (the importer,
the orchestrator's request parsing) by one stable rule, documented in docs/data.md:

- a string of 1..19 ASCII digits below 2**63 is that integer (``"42"`` -> 42; ``"007"``
  -> 7), so integer ids work exactly as before;
- any other key of 1..64 characters from ``A-Z a-z 0-9 . _ : - @ / +`` is
  :func:`key_hash`: BLAKE2b with an 8-byte digest of its UTF-8 bytes, read big-endian,
  top bit cleared (63 bits); a key that reads as a signed or decimal number (``-5``,
  ``1.5``, ``1e5``) is refused: it is almost always a broken integer column;
- anything else (empty, longer, spaces, control or non-ASCII characters, digit strings
  at or above 2**63) is refused.

Two keys of one dataset that map to the same int64 are refused by the importer; the
answer's external id comes from the release's item key table (internal -> key).
"""

from __future__ import annotations

import hashlib
import re

ID_LIMIT = 2**63  # ids are int64: 0 <= id < 2**63
ID_MAX_DIGITS = len(str(ID_LIMIT - 1))  # 19
KEY_MAX_CHARS = 64
KEY_CHARSET = "A-Z a-z 0-9 . _ : - @ / +"  # as documented (docs/data.md)
# The same rule as a regular expression (re and Arrow's RE2 both read it).
KEY_PATTERN = r"[A-Za-z0-9._:@/+\-]{1,64}"
_KEY = re.compile(KEY_PATTERN, re.ASCII)
# Numbers that are not plain non-negative integers: refused as keys.
NUMBER_PATTERN = r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
_NUMBER = re.compile(NUMBER_PATTERN, re.ASCII)
KEY_RULE = (
    f"a non-negative integer or a key of 1..{KEY_MAX_CHARS} characters from {KEY_CHARSET} "
    "(not a signed or decimal number)"
)
_MASK = ID_LIMIT - 1


class InvalidId(ValueError):
    """An external id that breaks the rule above (the message says which part)."""


def is_digits(raw: str) -> bool:
    """ASCII digits only (str.isdigit alone accepts '²', '٣' and other Unicode digits)."""
    return raw.isascii() and raw.isdigit()


def key_hash(key: str) -> int:
    """The int64 id of a non-digit key: BLAKE2b-64 of its UTF-8 bytes, top bit cleared."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK


def check_key(raw: str, what: str = "id") -> None:
    """Raise :class:`InvalidId` unless ``raw`` is a valid external id."""
    if not raw:
        raise InvalidId(f"{what} is empty")
    if is_digits(raw):
        if len(raw) > ID_MAX_DIGITS or int(raw) >= ID_LIMIT:
            raise InvalidId(
                f"{what} must be a non-negative integer below 2**63 (at most "
                f"{ID_MAX_DIGITS} digits): out of range"
            )
        return
    if len(raw) > KEY_MAX_CHARS:
        raise InvalidId(f"{what} is longer than {KEY_MAX_CHARS} characters")
    if not _KEY.fullmatch(raw) or _NUMBER.fullmatch(raw):
        raise InvalidId(f"{what} must be {KEY_RULE}")


def internal_id(raw: str, what: str = "id") -> int:
    """The int64 id of a valid external id (digits: their value; keys: :func:`key_hash`)."""
    check_key(raw, what)
    return int(raw) if is_digits(raw) else key_hash(raw)


def external_id(item: int, keys: dict[int, str] | None) -> str:
    """The client's id of an internal one: its key when it came from one, else its digits."""
    if keys:
        key = keys.get(item)
        if key is not None:
            return key
    return str(item)
