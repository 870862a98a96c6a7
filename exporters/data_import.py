"""Import real data into the canonical raw tables (``recstack data import``).

The accepted schema, the rating → event mapping and the defaults for missing columns are
documented in docs/data.md; keep the two in step. Bad input raises UserError naming the
file, the place (``line N`` of a CSV file, counting the header as line 1; ``row N`` of a
parquet file, 1-based data rows) and the column. Nothing is written unless every check
passes (exporters.raw_tables.write_raw swaps the new folder in atomically).

Columns are checked with Arrow compute kernels first (fast on tens of millions of rows);
only when a kernel refuses a column do slower per-value checks look for the first bad row.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from exporters.raw_tables import KEY_COLUMNS, RawTables, read_meta, write_raw
from exporters.schema import CONTEXT_COLUMNS, CONTEXT_MAX_CHARS, EVENTS
from recstack.errors import UserError
from recstack.ids import KEY_PATTERN, KEY_RULE, NUMBER_PATTERN, key_hash
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Delimited text: comma, tab, semicolon, "|" or "::" (sniffed), optionally gzipped.
TEXT_SUFFIXES = tuple(
    f".{ext}{gz}" for ext in ("csv", "tsv", "txt", "dat", "data") for gz in ("", ".gz")
)
DELIMITERS = (",", "\t", ";", "|", "::")
_SNIFF_LINES = 50
_COLUMNS_HINT = "--columns user_id,item_id,rating,timestamp"
PARQUET_SUFFIXES = (".parquet", ".pq")
# Ratings → events (docs/data.md "Ratings"): on a 1-5 scale, ratings at or above these
# become these events (else "view"); other scales get the same cut as shares of their top.
RATING_EVENTS: tuple[tuple[float, str], ...] = ((4.0, "purchase"), (3.0, "click"))
_STARS = 5.0  # the scale RATING_EVENTS is written for
# Values from 0 up whose top is above COUNT_TOP (no star scale's is) and above COUNT_SKEW
# times their median are counts (plays, visits: most rows at the bottom of a long tail),
# cut at quantiles: scaled to the top, almost none of them would be positive.
COUNT_TOP, COUNT_SKEW = 20.0, 10.0
# Plain digits: at most 18 of them always fit in int64.
_INT_RE = r"^\s*\d{1,18}\s*$"
_NUM_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_NAT = np.iinfo(np.int64).min  # "no timestamp" in int64 µs arrays
_TS_HINT = "expected ISO-8601 (e.g. 2026-07-01T12:00:00Z) or unix seconds"
# Accepted timestamps: after the feature tables' baseline rows (1970-01-02, which must come
# before every real row) and at most a day past the import's clock — a row in the future
# stretches the split's windows over empty time and stamps online rows past every real
# event. Unix seconds 0 (a common "unknown") is refused by the same rule.
TIME_MIN = pd.Timestamp("1970-01-03", tz="UTC")
TIME_MAX_AHEAD = pd.Timedelta(days=1)
# Rating files without a timestamp column (goodbooks-10k, Book-Crossing, Last.fm's play
# counts) get each user's events spread over this span before the import day, in the order
# TIME_ORDERS[...] names (docs/data.md "Files without timestamps").
TIME_ORDERS = ("random", "file")
SYNTHETIC_SPAN = pd.Timedelta(days=365)


@dataclass(frozen=True)
class RatingCut:
    """Ratings at or above ``purchase`` become purchases, at or above ``click`` clicks, the
    rest views; ``rule`` says how the cut was chosen (the import reports it)."""

    purchase: float
    click: float
    rule: str

    def events(self, ratings: np.ndarray) -> np.ndarray:
        """Event codes (indices into EVENTS) of ``ratings``."""
        codes = np.zeros(len(ratings), dtype=np.int8)
        codes[ratings >= self.click] = EVENTS.index("click")
        codes[ratings >= self.purchase] = EVENTS.index("purchase")
        return codes

    @property
    def positive(self) -> float:
        """The lowest rating that is a strong positive: a purchase, or a click where the
        cut has no purchases (one rating value)."""
        return self.purchase if np.isfinite(self.purchase) else self.click

    @classmethod
    def parse(cls, text: str) -> RatingCut:
        """``--rating-cut PURCHASE,CLICK`` (e.g. ``8,6``)."""
        try:
            purchase, click = (float(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--rating-cut {text!r}: expected PURCHASE,CLICK, e.g. 8,6") from None
        if not click <= purchase:
            raise UserError(f"--rating-cut {text!r}: the purchase cut is below the click cut")
        return cls(purchase, click, "given (--rating-cut)")


def rating_cut(ratings: np.ndarray) -> RatingCut:
    """The cut for these ratings (docs/data.md "Ratings"):

    - all equal (implicit data written as ratings): every rating is a click;
    - counts (from 0 up, a top above COUNT_TOP and COUNT_SKEW times the median): click from
      the median, purchase from the 75th percentile;
    - a scale from 0 up: the 1-5 cut (>= 4 purchase, >= 3 click) as shares of the top
      rating — 1-5, 0.5-5 and 0-5 keep 4 and 3, 1-10 gets 8 and 6, 0/1 likes give
      purchases and views;
    - a scale with negatives (-10..10): the 1-5 cut placed on the range.

    The top rating is always a purchase (or a click), so no file becomes views only."""
    r = np.asarray(ratings, dtype=np.float64)
    lo, hi = float(r.min()), float(r.max())
    if lo == hi:
        return RatingCut(float("inf"), lo, f"one value ({lo:g}): every rating is a click")
    median = float(np.median(r))
    if lo >= 0 and hi > COUNT_TOP and hi > COUNT_SKEW * median:
        upper = float(np.quantile(r, 0.75))
        if upper == median:  # ties at the median: the purchases start above it
            upper = float(r[r > median].min())
        return RatingCut(
            upper, median, f"counts ({lo:g}..{hi:g}, median {median:g}): median and 75th percentile"
        )
    (purchase, _), (click, _) = RATING_EVENTS
    if lo >= 0:
        # hi * 4 / 5, not hi * 0.8: exact on the usual scales (5 * 0.6 is 3.0000000000000004)
        return RatingCut(
            hi * purchase / _STARS,
            hi * click / _STARS,
            "a 5-star scale" if hi == _STARS else f"the 5-star cut scaled to a top of {hi:g}",
        )
    span = hi - lo
    return RatingCut(
        lo + span * (purchase - 1) / (_STARS - 1),
        lo + span * (click - 1) / (_STARS - 1),
        f"the 5-star cut on the range {lo:g}..{hi:g}",
    )


@dataclass
class _Source:
    """One input file, its columns as read, and how to name a row in messages."""

    path: Path
    table: pa.Table
    is_csv: bool
    header: bool = True  # a text file's first line names the columns
    assumed_order: bool = False  # header-less, read in RATING_ORDER without --columns

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def has(self, col: str) -> bool:
        return col in self.table.column_names

    def col(self, col: str) -> pa.Array:
        arr = self.table[col].combine_chunks()
        # Categorical columns (pandas/parquet dictionaries) are checked as their values.
        return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr

    def where(self, pos: int) -> str:
        """Human location of the 0-based data row ``pos``."""
        # Text: the header is line 1 (blank lines and quoted fields spanning lines would
        # shift this; docs/data.md says so).
        return f"line {pos + 1 + self.header}" if self.is_csv else f"row {pos + 1}"

    def fail(self, pos: int, col: str, problem: str) -> UserError:
        return UserError(f"{self.path}: {self.where(pos)}, column {col!r}: {problem}")

    def value(self, col: str, pos: int) -> object:
        return self.table[col][pos].as_py()

    def need(self, *cols: str) -> None:
        for c in cols:
            if not self.has(c):
                raise UserError(
                    f"{self.path}: missing column {c!r} "
                    f"(found columns: {', '.join(self.table.column_names)}); "
                    f"--map FILE:COLUMN={c} names one of them as {c}"
                    + (
                        ", or --columns if the first line is data, not names"
                        if self.is_csv and self.header
                        else ""
                    )
                )


def column_name(name: str, known: tuple[str, ...] = ()) -> str:
    """A column's name as the schema spells it: ``userId``, ``User-ID`` and ``USER_ID``
    are ``user_id``; ``UserID`` and ``userid`` are too when ``user_id`` is in ``known``."""
    name = str(name).strip("\ufeff \t\"'")
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    snake = re.sub(r"[^a-z0-9]+", "_", snake).strip("_")
    squeezed = snake.replace("_", "")
    return next((k for k in known if k.replace("_", "") == squeezed), snake)


def _sniff(path: Path) -> tuple[str, list[list[str]]]:
    """The delimiter that splits the file's first lines into the same number (>= 2) of
    fields, the most fields winning (ties: DELIMITERS' order); failing that (a ragged line,
    reported by line once read) the one that splits the first line most; else a comma (one
    column). And those lines, split."""
    with _open_text(path) as f:
        lines = [line for line in itertools.islice(f, _SNIFF_LINES) if line.strip()]
    if not lines:
        raise UserError(f"{path}: empty file (no header, no data rows)")
    ranked = []
    for d in DELIMITERS:
        if len(d) == 1:
            rows = list(csv.reader(lines, delimiter=d))
        else:
            rows = [line.rstrip("\r\n").split(d) for line in lines]
        even = len({len(r) for r in rows}) == 1
        ranked.append((len(rows[0]) >= 2 and even, len(rows[0]), -DELIMITERS.index(d), d, rows))
    _, width, _, d, rows = max(ranked, key=lambda r: r[:3])
    return (d, rows) if width >= 2 else (",", list(csv.reader(lines)))


def _looks_like_data(row: list[str]) -> bool:
    """A first line of numbers (and dates) only: data, not column names."""
    return all(re.match(_NUM_RE, v) or re.match(r"^\s*\d{4}-\d\d-\d\d", v) for v in row)


# A ratings file without a header line, in the order MovieLens (u.data, ratings.dat) and
# most rating dumps use: read so when its first lines fit it (rating_order).
RATING_ORDER = ("user_id", "item_id", "rating", "timestamp")
_UNIX_SECONDS_MIN = 1e8  # 1973: a 4th column of smaller numbers is not a unix time


def rating_order(lines: list[list[str]]) -> list[str] | None:
    """:data:`RATING_ORDER`'s names for header-less lines of 3 numbers (user, item, rating)
    or 4 (and a unix time or an ISO date); None for any other shape."""
    width = len(lines[0])
    if width not in (3, 4) or any(len(r) != width for r in lines):
        return None
    if not all(re.match(_NUM_RE, v) for r in lines for v in r[:3]):
        return None
    if any(abs(float(r[2])) >= _UNIX_SECONDS_MIN for r in lines):
        return None  # user, item, time (no rating): not guessed
    if width == 4 and not all(
        (re.match(_NUM_RE, r[3]) and float(r[3]) >= _UNIX_SECONDS_MIN)
        or re.match(r"^\s*\d{4}-\d\d-\d\d", r[3])
        for r in lines
    ):
        return None
    return list(RATING_ORDER[:width])


def _read_text(
    path: Path, columns: list[str] | None, ratings: bool = False
) -> tuple[pa.Table, bool]:
    """A delimited text file, every column as text; ``columns`` names the columns of a
    file without a header line (with ``ratings``, a header-less file that fits
    :func:`rating_order` is read in that order). Returns the table and whether it had a
    header."""
    delimiter, first = _sniff(path)
    header = columns is None
    assumed = rating_order(first) if ratings else None
    if header and _looks_like_data(first[0]) and assumed is not None:
        log.warning(
            "%s: no header line; read as %s (MovieLens' order in u.data and ratings.dat); "
            "--columns names them otherwise",
            path,
            ",".join(assumed),
        )
        columns, header = assumed, False
    if header and _looks_like_data(first[0]):
        raise UserError(
            f"{path}: the first line ({', '.join(v.strip() for v in first[0][:6])}) holds "
            f"values, not column names: name the columns with --columns, e.g. {_COLUMNS_HINT}"
        )
    names = list(columns) if columns is not None else [c for c in first[0]]
    if len(names) != len(first[0]):
        raise UserError(
            f"{path}: --columns names {len(names)} columns, the file has {len(first[0])}"
        )
    source: Any = path
    if len(delimiter) > 1:  # Arrow splits on one character: "::" becomes the unit separator
        with _open_text(path) as f:
            text = f.read()
        if "\x1f" in text:
            raise UserError(f"{path}: holds the character \\x1f; cannot split on {delimiter!r}")
        source = io.BytesIO(text.replace(delimiter, "\x1f").encode())
        delimiter = "\x1f"
    elif path.name.lower().endswith(".gz"):
        source = pa.CompressedInputStream(pa.OSFile(str(path)), "gzip")
    table = pacsv.read_csv(
        source,
        read_options=pacsv.ReadOptions(
            column_names=[f"c{i}" for i in range(len(names))], skip_rows=int(header)
        ),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types={f"c{i}": pa.string() for i in range(len(names))},
            null_values=[""],
            strings_can_be_null=True,
        ),
    )
    return table.rename_columns(names), header


def _open_text(path: Path) -> TextIO:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", newline="", encoding="utf-8-sig")  # type: ignore[no-any-return,operator]


def _ragged_row(path: Path) -> None:
    """Raise naming the first line whose field count differs from the first line's (the
    fast reader reports no line numbers, so look again, slowly, only on this error path)."""
    delimiter, first = _sniff(path)
    width = len(first[0])
    with _open_text(path) as f:
        if len(delimiter) == 1:
            reader: Any = csv.reader(f, delimiter=delimiter)
            rows = ((reader.line_num, row) for row in reader)
        else:
            rows = ((i, line.rstrip("\r\n").split(delimiter)) for i, line in enumerate(f, 1))
        for line_num, row in rows:
            if row and len(row) != width:
                raise UserError(f"{path}: line {line_num}: expected {width} fields, got {len(row)}")


# The columns each file may carry (docs/data.md); anything else is reported as ignored.
KNOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": ("user_id", "item_id", "timestamp", "event", "rating", *CONTEXT_COLUMNS),
    "items": ("item_id", "category", "brand", "price", "created_at"),
    "users": ("user_id", "age_bucket", "country", "signup_at"),
}


def parse_columns(spec: str) -> list[str]:
    """``--columns user_id,item_id,rating,timestamp``: the names, in the schema's spelling."""
    names = [column_name(n, KNOWN_COLUMNS["interactions"]) for n in spec.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise UserError(f"--columns {spec!r}: expected distinct names, e.g. {_COLUMNS_HINT}")
    return names


def parse_column_maps(specs: list[str] | None) -> dict[str, dict[str, str]]:
    """``["users:occupation=country", ...]`` -> ``{"users": {"occupation": "country"}}``:
    an extra column of a file used as one of the schema's columns (docs/data.md)."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs or []:
        kind, _, pair = spec.partition(":")
        src, _, dest = pair.partition("=")
        kind, src, dest = kind.strip().lower(), column_name(src), dest.strip().lower()
        if kind not in KNOWN_COLUMNS or not src or not dest:
            raise UserError(
                f"--map {spec!r}: expected FILE:COLUMN=FIELD with FILE one of "
                f"{', '.join(KNOWN_COLUMNS)}, e.g. users:occupation=country"
            )
        if dest not in KNOWN_COLUMNS[kind]:
            raise UserError(
                f"--map {spec!r}: {dest!r} is not a column of {kind} "
                f"({', '.join(KNOWN_COLUMNS[kind])})"
            )
        out.setdefault(kind, {})[src] = dest
    return out


# Column names by which published rating files call the schema's fields (after
# column_name): MovieLens' movieId, Book-Crossing's ISBN and Book-Rating, Amazon's
# reviewerID / asin / overall / unixReviewTime, goodbooks' book_id, Last.fm's artistID.
_USER_WORDS = frozenset(
    [
        "user",
        "customer",
        "reviewer",
        "member",
        "client",
        "visitor",
        "account",
        "buyer",
        "listener",
        "reader",
    ]
)
_ITEM_NAMES = frozenset(
    ["item", "isbn", "asin", "sku", "product", "movie", "book", "track", "song", "artist"]
)
_RATING_NAMES = frozenset(["score", "stars", "overall", "weight", "plays", "playcount"])
_TIME_WORDS = frozenset(["time", "timestamp", "datetime", "date", "ts"])


def _field_of(name: str) -> str | None:
    """The interactions field a column name outside the schema most likely holds."""
    words = name.split("_")
    if (words[-1] == "id" and len(words) > 1) or name in _ITEM_NAMES | _USER_WORDS:
        return "user_id" if words[0] in _USER_WORDS else "item_id"
    if words[-1] in ("rating", "count") or name in _RATING_NAMES:
        return "rating"
    if _TIME_WORDS & set(words) or name.endswith("_at"):
        return "timestamp"
    return None


def inferred_columns(kind: str, names: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """Columns outside the schema taken as a missing field because their name says so and
    no other unmapped column claims the same field (``movie_id`` -> ``item_id``, the only
    ``*_rating`` -> ``rating``); ``--map`` always wins. A rating is inferred only where
    the file has no ``event`` column (a rating would turn its events into ratings)."""
    present = set(names) | set(mapping.values())
    wanted = {
        "interactions": ("user_id", "item_id", "rating", "timestamp"),
        "items": ("item_id",),
        "users": ("user_id",),
    }[kind]
    claims: dict[str, list[str]] = {}
    for n in names:
        field_ = _field_of(n) if n not in KNOWN_COLUMNS[kind] and n not in mapping else None
        if field_ in wanted and field_ not in present:
            claims.setdefault(field_, []).append(n)
    if "event" in present:
        claims.pop("rating", None)
    return {cols[0]: f for f, cols in claims.items() if len(cols) == 1}


def apply_column_map(src: _Source, kind: str, mapping: dict[str, str]) -> dict[str, Any]:
    """Rename mapped columns (``mapping``, then :func:`inferred_columns`), then say by name
    what is used and what is ignored."""
    names = list(src.table.column_names)
    inferred = inferred_columns(kind, names, mapping)
    for old, new in inferred.items():
        log.warning(
            "%s: column %r taken as %s (its name says so; --map %s:%s=FIELD to say otherwise)",
            src.path,
            old,
            new,
            kind,
            old,
        )
    mapping = {**mapping, **inferred}
    for old, new in mapping.items():
        if old not in names:
            raise UserError(
                f"{src.path}: --map {kind}:{old}={new}: no column {old!r} "
                f"(found columns: {', '.join(names)})"
            )
        if new in names:
            raise UserError(f"{src.path}: --map {kind}:{old}={new}: the file already has {new!r}")
    renamed = [mapping.get(n, n) for n in names]
    src.table = src.table.rename_columns(renamed)
    used = [n for n in renamed if n in KNOWN_COLUMNS[kind]]
    ignored = [n for n in renamed if n not in KNOWN_COLUMNS[kind]]
    if ignored:
        log.warning(
            "%s: columns %s are not part of the %s schema and were ignored (use --map "
            "%s:COLUMN=FIELD to use one as %s)",
            src.path,
            ignored,
            kind,
            kind,
            " / ".join(c for c in KNOWN_COLUMNS[kind] if c not in used) or "a field",
        )
    return {
        "file": src.path.name,
        "used": used,
        "mapped": {old: new for old, new in mapping.items() if old not in inferred},
        "inferred": inferred,
        "assumed_order": src.assumed_order,
        "ignored": ignored,
        "defaulted": [c for c in KNOWN_COLUMNS[kind] if c not in used and c != "rating"],
    }


def read_source(path: Path, kind: str = "", columns: list[str] | None = None) -> _Source:
    """Read a delimited text file (every column as text, so values are checked here rather
    than guessed by the reader) or a parquet file, chosen by extension. Column names are
    the schema's spelling of ``kind``'s columns where they match (:func:`column_name`);
    ``columns`` names the columns of a text file without a header line."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    header = True
    try:
        if name.endswith(TEXT_SUFFIXES):
            try:
                table, header = _read_text(path, columns, kind == "interactions")
            except pa.ArrowInvalid:
                _ragged_row(path)
                raise
            is_csv = True
        elif name.endswith(PARQUET_SUFFIXES):
            if columns is not None:
                raise UserError(f"{path}: --columns is for text files without a header line")
            table = pq.read_table(path)
            is_csv = False
        else:
            raise UserError(
                f"{path}: unknown file type; use {', '.join(TEXT_SUFFIXES + PARQUET_SUFFIXES)}"
            )
    except (pa.ArrowException, UnicodeDecodeError, OSError, csv.Error) as e:
        raise UserError(f"{path}: cannot read: {e}") from e
    known = KNOWN_COLUMNS.get(kind, ())
    table = table.rename_columns([column_name(c, known) for c in table.column_names])
    if table.num_rows == 0:
        raise UserError(f"{path}: empty file (no data rows)")
    return _Source(path, table, is_csv, header, is_csv and not header and columns is None)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _nulls(arr: pa.Array) -> np.ndarray:
    return arr.is_null().to_numpy(zero_copy_only=False)


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    """Per value: non-null and matching ``pattern``."""
    m = pc.match_substring_regex(arr, pattern)
    return pc.fill_null(m, False).to_numpy(zero_copy_only=False)


class _Keys:
    """The string ids (keys) of one kind (users or items) met in every file: internal id
    -> key, and the integer ids seen beside them, so that two ids mapping to one internal
    id are refused (docs/data.md "Ids")."""

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self.digits: list[np.ndarray] = []  # integer-id columns (compared once keys exist)

    def add(
        self,
        src: _Source,
        col: str,
        vals: np.ndarray,
        is_key: np.ndarray,
        distinct: tuple[list[str], np.ndarray] = ([], np.zeros(0, np.int64)),
    ) -> None:
        """Record ``col``'s values (``is_key``: rows whose value is a key; ``distinct``:
        its distinct keys and their hashes); raise on the first collision, naming both
        ids."""
        self.digits.append(vals[~is_key] if is_key.any() else vals)
        for key, h in zip(distinct[0], distinct[1].tolist(), strict=True):
            other = self.keys.setdefault(h, key)
            if other != key:
                raise src.fail(_first(is_key & (vals == h)), col, _collision(key, other, h))
        if not self.keys:
            return
        hashed = np.fromiter(self.keys, dtype=np.int64, count=len(self.keys))
        clash = np.concatenate([hashed[np.isin(hashed, d)] for d in self.digits])
        if clash.size:
            h = int(clash[0])
            raise UserError(f"{src.path}: column {col!r}: " + _collision(self.keys[h], str(h), h))

    def table(self, kind: str) -> pd.DataFrame:
        id_col, key_col = KEY_COLUMNS[kind]
        ids = sorted(self.keys)
        return pd.DataFrame({id_col: ids, key_col: [self.keys[i] for i in ids]})


def _collision(key: str, other: str, h: int) -> str:
    return (
        f"ids {key!r} and {other!r} both map to internal id {h} (the 63-bit hash of "
        'docs/data.md "Ids"); rename one of them'
    )


def _id_keys(
    src: _Source, col: str, arr: pa.Array, null: np.ndarray, what: str, keys: _Keys
) -> np.ndarray:
    """A text id column holding keys: digits keep their value, keys are hashed
    (recstack/ids.py, the rule the orchestrator applies to requests)."""
    text = pc.utf8_trim_whitespace(arr)
    digits = _matches(text, r"^[0-9]{1,19}$")
    ok = digits | (_matches(text, f"^{KEY_PATTERN}$") & ~_matches(text, f"^{NUMBER_PATTERN}$"))
    bad = ~null & ~ok
    if bad.any():
        pos = _first(bad)
        raise src.fail(
            pos, col, f"{src.value(col, pos)!r} is not a valid {what}: expected {KEY_RULE}"
        )
    vals = np.full(len(arr), -1, dtype=np.int64)
    if digits.any():
        num = pc.filter(text, pa.array(digits))
        as_int = pc.cast(num, pa.uint64()).to_numpy()  # 19 digits fit in uint64
        over = as_int >= 2**63
        if over.any():
            pos = int(np.flatnonzero(digits)[_first(over)])
            raise src.fail(pos, col, f"{src.value(col, pos)!r} is out of range (below 2**63)")
        vals[digits] = as_int.astype(np.int64)
    is_key = ~null & ~digits
    text_keys = pc.filter(text, pa.array(is_key))
    uniq = pc.unique(text_keys).to_pylist()
    hashes = np.fromiter((key_hash(k) for k in uniq), np.int64, len(uniq))
    if uniq:
        vals[is_key] = hashes[pc.index_in(text_keys, value_set=pa.array(uniq)).to_numpy()]
    keys.add(src, col, vals, is_key, (uniq, hashes))
    return vals


def _ids(
    src: _Source,
    col: str,
    allow_null: bool = False,
    what: str = "id",
    keys: _Keys | None = None,
) -> np.ndarray:
    """Non-negative int64 values of ``col`` (-1 where null, if ``allow_null``); with
    ``keys``, text values may be keys too (UUIDs, SKUs), recorded there."""
    arr = src.col(col)
    null = _nulls(arr)
    if null.any() and not allow_null:
        raise src.fail(_first(null), col, "missing value (expected a non-negative integer)")
    t = arr.type
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_integer(t):
        raw = pc.fill_null(arr, 0).to_numpy()
        if raw.dtype == np.uint64:
            bad = ~null & (raw > np.iinfo(np.int64).max)
            raw = np.where(bad, 0, raw)
        vals = np.where(null, -1, raw.astype(np.int64))
        bad |= ~null & (vals < 0)
    elif pa.types.is_floating(t):
        f = pc.fill_null(arr, 0.0).to_numpy()
        ok = np.isfinite(f)
        ok[ok] = (f[ok] == np.floor(f[ok])) & (f[ok] >= 0) & (f[ok] < 2**63)
        bad = ~null & ~ok
        vals = np.where(ok & ~null, f, -1).astype(np.int64)
    elif keys is not None and _is_text(arr) and not _matches(arr, _INT_RE)[~null].all():
        return _id_keys(src, col, arr, null, what, keys)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            vals = pc.fill_null(pc.cast(pc.utf8_trim_whitespace(arr), pa.int64()), -1).to_numpy()
            bad = ~null & (vals < 0)
        except pa.ArrowInvalid as e:
            # Find the first offending value; only plain digits are ids.
            bad = ~null & ~_matches(arr, _INT_RE)
            if not bad.any():
                raise UserError(f"{src.path}: column {col!r}: {e}") from e
            vals = np.full(len(arr), -1, dtype=np.int64)
    else:
        raise UserError(f"{src.path}: column {col!r} has type {t}; expected integer ids")
    if bad.any():
        pos = _first(bad)
        raise src.fail(
            pos,
            col,
            f"{src.value(col, pos)!r} is not a valid {what} ({what}s are non-negative integers)",
        )
    if keys is not None:
        keys.add(src, col, vals, np.zeros(len(vals), dtype=bool))
    return vals


def _codes(src: _Source, col: str) -> np.ndarray:
    """A small categorical code column: integers as given, or labels mapped to 1, 2, ...
    in sorted order. Missing column or empty cells → 0."""
    if not src.has(col):
        return np.zeros(src.num_rows, dtype=np.int64)
    arr = src.col(col)
    null = _nulls(arr)
    textual = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    # Numbers (negative or fractional ones included) go through the id checks, which
    # refuse what is not a valid code; anything else is labels.
    if not textual or _matches(arr, _NUM_RE)[~null].all():
        return np.where(null, 0, _ids(src, col, allow_null=True, what="code"))
    labels = pc.utf8_trim_whitespace(arr)
    uniq = pc.sort_indices(pc.unique(labels).drop_null())
    uniq = pc.take(pc.unique(labels).drop_null(), uniq)
    codes = pc.fill_null(pc.index_in(labels, value_set=uniq), -1).to_numpy() + 1
    log.info("%s: column %r holds labels; mapped %d labels to codes 1..", src.path, col, len(uniq))
    return codes.astype(np.int64)


def _numbers(src: _Source, col: str) -> np.ndarray:
    """Float values of a numeric or text column (NaN where null); refuses non-numbers."""
    arr = src.col(col)
    null = _nulls(arr)
    try:
        vals = pc.cast(pc.utf8_trim_whitespace(arr) if _is_text(arr) else arr, pa.float64())
        f = pc.fill_null(vals, np.nan).to_numpy()
        bad = ~null & ~np.isfinite(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        bad = ~null & ~_matches(arr, _NUM_RE) if _is_text(arr) else np.zeros(len(arr), bool)
        if not bad.any():
            raise UserError(f"{src.path}: column {col!r} ({arr.type}): {e}") from e
        f = np.full(len(arr), np.nan)
    if bad.any():
        pos = _first(bad)
        raise src.fail(pos, col, f"{src.value(col, pos)!r} is not a number")
    return f


def _is_text(arr: pa.Array) -> bool:
    return pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)


def _price(src: _Source, col: str = "price") -> np.ndarray:
    """Non-negative prices; missing column or empty cells → 0.0."""
    if not src.has(col):
        return np.zeros(src.num_rows)
    f = _numbers(src, col)
    bad = f < 0
    if bad.any():
        pos = _first(bad)
        raise src.fail(pos, col, f"{src.value(col, pos)!r} is negative")
    return np.where(np.isnan(f), 0.0, f)


def _timestamps(src: _Source, col: str, allow_null: bool = False) -> np.ndarray:
    """int64 µs since the epoch (UTC; ``_NAT`` where null) from ISO-8601 text (no offset
    means UTC), unix seconds, or a timestamp column (naive means UTC)."""
    arr = src.col(col)
    null = _nulls(arr)
    if null.any() and not allow_null:
        raise src.fail(_first(null), col, "missing value (expected a timestamp)")
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        tz = None if pa.types.is_date(t) else t.tz
        # The instant is the same in any zone; sub-microsecond digits are dropped.
        us = pc.cast(pc.cast(arr, pa.timestamp("us", tz=tz), safe=False), pa.int64())
        native = pc.fill_null(us, _NAT).to_numpy()
        _in_range(src, col, native)
        return native
    if not (_is_text(arr) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise UserError(f"{src.path}: column {col!r} has type {t}; expected timestamps")
    is_num = ~null if not _is_text(arr) else _matches(arr, _NUM_RE)
    secs = np.full(len(arr), np.nan)
    if is_num.any():
        num = arr if not _is_text(arr) else pc.utf8_trim_whitespace(arr)
        secs[is_num] = pc.cast(pc.filter(num, pa.array(is_num)), pa.float64()).to_numpy()
    # Unix seconds within what datetime64[ns] holds (1678..2261); others are errors.
    bad = is_num & ~(np.abs(secs) < 9.2e9)
    if bad.any():
        pos = _first(bad)
        raise src.fail(pos, col, f"{src.value(col, pos)!r} is out of range as unix seconds")
    us = np.where(is_num, np.round(np.nan_to_num(secs) * 1e6), 0).astype(np.int64)
    us[null] = _NAT
    rest = np.flatnonzero(~is_num & ~null)
    if rest.size:
        text = pc.utf8_trim_whitespace(pc.take(arr, pa.array(rest)))
        us[rest] = _iso_us(src, col, text, rest)
    _in_range(src, col, us)
    return us


def time_range(now: pd.Timestamp | None = None) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The accepted timestamps, inclusive: TIME_MIN .. ``now`` + TIME_MAX_AHEAD."""
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    return TIME_MIN, now + TIME_MAX_AHEAD


def _in_range(src: _Source, col: str, us: np.ndarray, now: pd.Timestamp | None = None) -> None:
    """Refuse the first timestamp outside :func:`time_range`, naming its place."""
    lo, hi = time_range(now)
    lo_us, hi_us = lo.value // 1000, hi.value // 1000
    bad = (us != _NAT) & ((us < lo_us) | (us > hi_us))
    if bad.any():
        pos = _first(bad)
        when = pd.Timestamp(int(us[pos]), unit="us", tz="UTC").isoformat()
        raise src.fail(
            pos,
            col,
            f"{src.value(col, pos)!r} ({when}) is outside the accepted range "
            f"{lo.date()} .. {hi.isoformat(timespec='seconds')} (UTC; up to a day ahead "
            "of the import's clock)",
        )


def _iso_us(src: _Source, col: str, text: pa.Array, rows: np.ndarray) -> np.ndarray:
    """int64 µs of ISO-8601 strings (``rows``: their positions in the file)."""
    # Arrow's parser is fast but wants all values with an offset, or all without; pandas
    # takes any mix (and nanoseconds), so it is the fallback and the error locator.
    for ts_type in (pa.timestamp("us", tz="UTC"), pa.timestamp("us")):
        try:
            return pc.cast(pc.cast(text, ts_type), pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass
    parsed = pd.to_datetime(text.to_pandas(), format="ISO8601", utc=True, errors="coerce")
    failed = parsed.isna().to_numpy()
    if failed.any():
        pos = int(rows[_first(failed)])
        raise src.fail(pos, col, f"cannot parse {src.value(col, pos)!r} as a timestamp; {_TS_HINT}")
    return parsed.dt.tz_convert(None).to_numpy().astype("datetime64[us]").view(np.int64)


def synthetic_times(
    user_ids: np.ndarray,
    order: str = "random",
    seed: int = 0,
    end: pd.Timestamp | None = None,
    item_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Event times (int64 µs, UTC) for a file without any: each user's events get times
    drawn uniformly over the :data:`SYNTHETIC_SPAN` before ``end`` (default: the start of
    today, UTC), assigned in ``order`` — ``random`` (a seeded shuffle: a random
    leave-last-out split, the usual protocol for data without time) or ``file`` (the
    file's row order is each user's order). With ``item_ids``, a user's rows for the same
    item stay together in file order (a view then a purchase, a re-rating): shuffled apart,
    the later row would be held out behind an earlier one that already makes the item
    seen. Users stay interleaved in time, so the split's windows and the feature windows
    see a steady stream rather than one user after another; the same inputs give the same
    times."""
    if order not in TIME_ORDERS:
        raise UserError(f"time order {order!r}: expected one of {', '.join(TIME_ORDERS)}")
    users = np.asarray(user_ids)
    n = len(users)
    rng = np.random.default_rng(seed)
    draws = rng.random(n)  # first: both orders place events at the same times
    by_draw = np.lexsort((draws, users))  # each user's times, ascending
    rows = np.arange(n)
    if order == "file":
        by_rank = np.lexsort((rows, users))  # the same user groups, events in their order
    else:
        if item_ids is None:
            group = rows
        else:  # one random rank per (user, item) pair
            pairs = np.stack([users, np.asarray(item_ids)], axis=1)
            group = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
        rank = rng.permutation(int(group.max(initial=-1)) + 1)[group]
        by_rank = np.lexsort((rows, rank, users))
    last = pd.Timestamp.now("UTC").floor("D") if end is None else pd.Timestamp(end)
    span_us = SYNTHETIC_SPAN.value // 1000
    start_us = last.value // 1000 - span_us
    out = np.empty(n, np.int64)
    out[by_rank] = start_us + (draws[by_draw] * span_us).astype(np.int64)
    return out


def _context(src: _Source, col: str) -> np.ndarray:
    """A request-context column (``surface``/``device``): free text of at most
    CONTEXT_MAX_CHARS characters, trimmed; missing column or cell: "" (not known)."""
    if not src.has(col):
        return np.full(src.table.num_rows, "", dtype=object)
    arr = pc.utf8_trim_whitespace(pc.cast(src.col(col), pa.string()))
    long = pc.fill_null(pc.greater(pc.utf8_length(arr), CONTEXT_MAX_CHARS), False)
    bad = np.asarray(long.to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        pos = _first(bad)
        raise src.fail(pos, col, f"longer than {CONTEXT_MAX_CHARS} characters")
    return np.asarray(pc.fill_null(arr, "").to_numpy(zero_copy_only=False), dtype=object)


def _events(src: _Source, cut: RatingCut | None = None) -> tuple[np.ndarray, RatingCut | None]:
    """Event codes (indices into EVENTS) from ``event`` or, failing that, from ``rating``
    through ``cut`` (default :func:`rating_cut` of the ratings), and the cut used (None for
    an event column; docs/data.md). A given ``cut`` without a rating column to apply it to
    is refused: the events would silently not be the ones asked for."""
    if cut is not None and (src.has("event") or not src.has("rating")):
        has = "an 'event' column" if src.has("event") else "no rating column (implicit pairs)"
        raise UserError(
            f"{src.path}: --rating-cut applies to a rating column, but the file has {has} "
            f"(columns: {', '.join(src.table.column_names)}); drop --rating-cut, or name the "
            "rating column with --map interactions:COLUMN=rating"
        )
    if src.has("event"):
        arr = src.col("event")
        null = _nulls(arr)
        if null.any():
            raise src.fail(_first(null), "event", f"missing value (expected one of {EVENTS})")
        if not _is_text(arr):
            raise UserError(f"{src.path}: column 'event' has type {arr.type}; expected text")
        # Few distinct values: normalise those, not every row.
        enc = arr.dictionary_encode()
        names = [str(v).strip().lower() for v in enc.dictionary.to_pylist()]
        lookup = np.array([EVENTS.index(n) if n in EVENTS else -1 for n in names])
        codes = lookup[enc.indices.to_numpy()]
        if (codes < 0).any():
            pos = _first(codes < 0)
            raise src.fail(
                pos,
                "event",
                f"unknown event {src.value('event', pos)!r} (expected one of {EVENTS})",
            )
        return codes.astype(np.int8), None
    if src.has("rating"):
        r = _numbers(src, "rating")
        null = np.isnan(r)
        if null.any():
            raise src.fail(_first(null), "rating", "missing value (expected a number)")
        if not len(r):
            return np.zeros(0, dtype=np.int8), cut
        cut = cut or rating_cut(r)
        return cut.events(r), cut
    # Implicit feedback (purchases, plays, likes as user-item pairs): each row is one
    # interaction, as a file of ratings that are all equal would be.
    log.warning(
        "%s: no event or rating column (found: %s): each row is one interaction, a click "
        "(implicit feedback); --map interactions:COLUMN=rating names a rating or count column",
        src.path,
        ", ".join(src.table.column_names),
    )
    implicit = RatingCut(float("inf"), 1.0, "no rating column: every row is a click")
    return implicit.events(np.ones(src.num_rows)), implicit


def _unique(src: _Source, col: str, ids: np.ndarray) -> None:
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        pos = _first(dup)
        raise src.fail(pos, col, f"duplicate {col} {ids[pos]}")


def _known(src: _Source, col: str, ids: np.ndarray, known: np.ndarray, table: Path) -> None:
    unknown = ~np.isin(ids, known)
    if unknown.any():
        pos = _first(unknown)
        raise src.fail(pos, col, f"{col} {ids[pos]} is not in the {col[:-3]}s table ({table})")


def _utc(us: np.ndarray) -> pd.Series:
    """int64 µs → a datetime64[us, UTC] column."""
    return pd.Series(us.astype("datetime64[us]")).dt.tz_localize("UTC")


def _first_times(
    ids: np.ndarray, inter_ids: np.ndarray, inter_us: np.ndarray, given: np.ndarray, what: str
) -> np.ndarray:
    """Creation/signup times: ``given`` (``_NAT`` = missing) filled with the first
    interaction, else the earliest interaction overall; a time after the first interaction
    is moved back to it, since downstream features rely on nobody acting on an item before
    it exists (or before signing up)."""
    first = pd.Series(inter_us).groupby(inter_ids).min()
    none = np.iinfo(np.int64).max
    fs = first.reindex(ids, fill_value=none).to_numpy()
    out = np.where(given == _NAT, np.where(fs == none, inter_us.min(), fs), given)
    late = out > fs
    if late.any():
        log.warning("%d %s after their first interaction; moved back to it", late.sum(), what)
        out[late] = fs[late]
    return out


def import_data(
    settings: Settings,
    interactions: Path,
    items: Path | None = None,
    users: Path | None = None,
    column_maps: dict[str, dict[str, str]] | None = None,
    cut: RatingCut | None = None,
    column_names: list[str] | None = None,
    time_order: str | None = None,
) -> Path:
    """Check and convert the given files, then atomically replace ``settings.raw_dir``.
    ``column_maps`` renames extra columns onto schema columns per file (see
    :func:`parse_column_maps`); every file's used, mapped, defaulted and ignored columns
    are logged and recorded in ``meta.json`` (``import_columns``). Ratings become events
    through ``cut`` (default: :func:`rating_cut` of the file's ratings), recorded in
    ``meta.json`` as ``rating_cut``. ``column_names`` names the columns of an interactions file
    without a header line (MovieLens' ``u.data``, ``ratings.dat``). An interactions file
    without a ``timestamp`` column gets :func:`synthetic_times` in ``time_order`` (default
    ``random``), recorded in ``meta.json`` as ``timestamps``.

    Raises UserError (naming file, line/row and column) on bad input; on failure the
    existing raw data is left untouched. Returns ``settings.raw_dir``.
    """
    if time_order is not None and time_order not in TIME_ORDERS:
        raise UserError(f"--time-order {time_order!r}: expected one of {', '.join(TIME_ORDERS)}")
    maps = column_maps or {}
    columns: dict[str, Any] = {}
    isrc = read_source(Path(interactions), "interactions", column_names)
    columns["interactions"] = apply_column_map(isrc, "interactions", maps.get("interactions", {}))
    isrc.need("user_id", "item_id")
    user_keys, item_keys = _Keys(), _Keys()
    user_ids = _ids(isrc, "user_id", keys=user_keys)
    item_ids = _ids(isrc, "item_id", keys=item_keys)
    times: dict[str, object] = {"source": "column timestamp"}
    if isrc.has("timestamp"):
        if time_order is not None:
            raise UserError(
                f"{isrc.path}: --time-order is for a file without a timestamp column; "
                "this one has one"
            )
        ts = _timestamps(isrc, "timestamp")
    else:
        sequence = time_order or "random"
        end = pd.Timestamp.now("UTC").floor("D")
        ts = synthetic_times(user_ids, sequence, end=end, item_ids=item_ids)
        times = {
            "source": "synthesized",
            "order": sequence,
            "span_days": SYNTHETIC_SPAN.days,
            "end": end.isoformat(),
        }
        log.warning(
            "%s: no timestamp column (found: %s): each user's events get times spread over "
            "the %d days before %s in %s order (--time-order random|file; --map "
            "interactions:COLUMN=timestamp if one of the columns is the time)",
            isrc.path,
            ", ".join(isrc.table.column_names),
            SYNTHETIC_SPAN.days,
            end.date(),
            sequence,
        )
    events, used_cut = _events(isrc, cut)
    context = {c: _context(isrc, c) for c in CONTEXT_COLUMNS}
    # A rating is a consumption whatever its value: every event makes the item "seen"
    # (exporters/seen.py). An explicit event column keeps the marketplace meaning.
    seen = list(EVENTS) if not isrc.has("event") else None

    item_src = read_source(Path(items), "items") if items is not None else None
    if item_src is None:
        iids = np.unique(item_ids)
        n = len(iids)
        cat = brand = np.zeros(n, np.int64)
        price = np.zeros(n)
        created = np.full(n, _NAT)
    else:
        columns["items"] = apply_column_map(item_src, "items", maps.get("items", {}))
        item_src.need("item_id")
        iids = _ids(item_src, "item_id", keys=item_keys)
        _unique(item_src, "item_id", iids)
        cat, brand = _codes(item_src, "category"), _codes(item_src, "brand")
        price = _price(item_src)
        created = (
            _timestamps(item_src, "created_at", allow_null=True)
            if item_src.has("created_at")
            else np.full(len(iids), _NAT)
        )
        # Unknown references are reported against the interactions file, where the fix is.
        _known(isrc, "item_id", item_ids, iids, item_src.path)

    user_src = read_source(Path(users), "users") if users is not None else None
    if user_src is None:
        uids = np.unique(user_ids)
        n = len(uids)
        age = country = np.zeros(n, np.int64)
        signup = np.full(n, _NAT)
    else:
        columns["users"] = apply_column_map(user_src, "users", maps.get("users", {}))
        user_src.need("user_id")
        uids = _ids(user_src, "user_id", keys=user_keys)
        _unique(user_src, "user_id", uids)
        age, country = _codes(user_src, "age_bucket"), _codes(user_src, "country")
        signup = (
            _timestamps(user_src, "signup_at", allow_null=True)
            if user_src.has("signup_at")
            else np.full(len(uids), _NAT)
        )
        _known(isrc, "user_id", user_ids, uids, user_src.path)

    created = _first_times(iids, item_ids, ts, created, "items created")
    signup = _first_times(uids, user_ids, ts, signup, "users signed up")
    order = np.lexsort((events, item_ids, user_ids, ts))
    io, uo = np.argsort(iids, kind="stable"), np.argsort(uids, kind="stable")
    names = [f"interactions={Path(interactions).name}"]
    names += [f"{k}={Path(v).name}" for k, v in (("items", items), ("users", users)) if v]
    tables = RawTables(
        interactions=pd.DataFrame(
            {
                "user_id": user_ids[order],
                "item_id": item_ids[order],
                "timestamp": _utc(ts[order]),
                "event": pd.Categorical.from_codes(events[order], categories=list(EVENTS)),
                **{c: v[order] for c, v in context.items()},
            }
        ),
        items=pd.DataFrame(
            {
                "item_id": iids[io],
                "category": cat[io],
                "brand": brand[io],
                "price": price[io],
                "created_at": _utc(created[io]),
            }
        ),
        users=pd.DataFrame(
            {
                "user_id": uids[uo],
                "age_bucket": age[uo],
                "country": country[uo],
                "signup_at": _utc(signup[uo]),
            }
        ),
    )
    given = item_src is not None and item_src.has("created_at")
    extra: dict[str, object] = {
        "import_columns": columns,
        # Without creation times an item is "created" at its first interaction: no
        # freshness signal to boost (orchestrator/postprocess.py).
        "item_created_at": "given" if given else "first interaction",
        "timestamps": times,
    }
    if seen:
        extra["seen_events"] = seen
    if used_cut is not None:
        extra["rating_cut"] = {
            "purchase": used_cut.purchase if np.isfinite(used_cut.purchase) else None,
            "click": used_cut.click,
            "rule": used_cut.rule,
        }
    key_tables = {
        kind: k.table(kind) for kind, k in (("items", item_keys), ("users", user_keys)) if k.keys
    }
    if key_tables:
        # How many ids of each kind are keys (the rest are integers): docs/data.md "Ids".
        extra["id_keys"] = {
            kind: len(k.keys) for kind, k in (("items", item_keys), ("users", user_keys))
        }
    return write_raw(
        settings,
        tables,
        source="import:" + ",".join(names),
        extra_meta=extra,
        keys=key_tables,
    )


def cli(args: argparse.Namespace) -> int:
    """``recstack data import --interactions F [--items F] [--users F]``."""
    settings = get_settings()
    raw = import_data(
        settings,
        Path(args.interactions),
        Path(args.items) if args.items else None,
        Path(args.users) if args.users else None,
        parse_column_maps(getattr(args, "map", None)),
        RatingCut.parse(args.rating_cut) if getattr(args, "rating_cut", None) else None,
        parse_columns(args.columns) if getattr(args, "columns", None) else None,
        getattr(args, "time_order", None),
    )
    meta = read_meta(raw)
    print(
        f"{meta['source']}: {meta['n_interactions']:,} events {meta['events']}, "
        f"{meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{meta['start']} .. {meta['end']}; snapshot {meta['snapshot']} -> {raw}"
    )
    for kind, cols in dict(meta.get("import_columns") or {}).items():  # type: ignore[call-overload]
        mapped = ", ".join(
            [f"{a}->{b}" for a, b in cols["mapped"].items()]
            + [f"{a}->{b} (by its name)" for a, b in cols.get("inferred", {}).items()]
        )
        mapped = mapped or "none"
        order = " (no header line: read in the rating order)" if cols.get("assumed_order") else ""
        print(
            f"  {kind} ({cols['file']}{order}): used {', '.join(cols['used'])}; "
            f"mapped {mapped}; "
            f"defaults for {', '.join(cols['defaulted']) or 'nothing'}; "
            f"ignored {', '.join(cols['ignored']) or 'nothing'}"
        )
    if meta.get("id_keys"):
        keys = dict(meta["id_keys"])  # type: ignore[call-overload]
        print(
            f"  string ids: {keys['users']:,} user keys, {keys['items']:,} item keys "
            '(docs/data.md "Ids")'
        )
    if meta.get("rating_cut"):
        cut = dict(meta["rating_cut"])  # type: ignore[call-overload]
        purchase = "none" if cut["purchase"] is None else f">= {cut['purchase']:g}"
        print(
            f"  ratings -> events: purchase {purchase}, click >= {cut['click']:g}, "
            f"else view ({cut['rule']}; --rating-cut PURCHASE,CLICK to choose)"
        )
    times = dict(meta.get("timestamps") or {})  # type: ignore[call-overload]
    if times.get("source") == "synthesized":
        print(
            f"  no timestamps: each user's events spread over the {times['span_days']} days "
            f"before {times['end'][:10]} in {times['order']} order (docs/data.md)"
        )
    if meta.get("seen_events"):
        print(f"  ratings: every rated item counts as seen ({', '.join(meta['seen_events'])})")  # type: ignore[arg-type]
    return 0
