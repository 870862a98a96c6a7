"""Importing real data: round trips, the rating mapping, and refusals that name the file,
the line/row and the column while leaving the previous raw data untouched."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exporters.data_import import (
    RatingCut,
    import_data,
    parse_column_maps,
    parse_columns,
    rating_cut,
    synthetic_times,
)
from exporters.raw_tables import read_meta, read_raw
from recstack.errors import UserError
from recstack.ids import key_hash
from recstack.settings import Settings

GOOD = "user_id,item_id,timestamp,event\n1,10,2026-07-01T00:00:00Z,view\n2,11,1782864000,click\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _state(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (temp folders included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _csv(rows: list[str], header: str = "user_id,item_id,timestamp,event") -> str:
    return "\n".join([header, *rows]) + "\n"


# (case, files {name: text}, expected message fragments). The interactions file is
# "inter.csv" unless named otherwise; fragments name the file, the place and the column.
ERRORS = {
    "missing column": (
        {"inter.csv": "user_id,timestamp,event\n1,2026-07-01,view\n"},
        ["inter.csv", "missing column 'item_id'"],
    ),
    "unparsable timestamp": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "1,3,yesterday,view"])},
        ["inter.csv", "line 3", "column 'timestamp'", "'yesterday'"],
    ),
    "impossible date": (
        {"inter.csv": _csv(["1,2,2026-13-01,view"])},
        ["inter.csv", "line 2", "column 'timestamp'"],
    ),
    "unix seconds out of range": (
        {"inter.csv": _csv(["1,2,1782864000000000,view"])},
        ["inter.csv", "line 2", "column 'timestamp'", "unix seconds"],
    ),
    "timestamp in the year 3000": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "1,3,3000-01-01,view"])},
        ["inter.csv", "line 3", "column 'timestamp'", "'3000-01-01'", "outside the accepted"],
    ),
    "timestamp a week ahead of the clock": (
        {
            "inter.csv": _csv(
                [
                    "1,2,2026-07-01,view",
                    f"1,3,{(pd.Timestamp.now('UTC') + pd.Timedelta(days=7)).isoformat()},view",
                ]
            )
        },
        ["inter.csv", "line 3", "column 'timestamp'", "up to a day ahead"],
    ),
    "unix seconds zero": (
        {"inter.csv": _csv(["1,2,1782864000,view", "1,3,0,view"])},
        ["inter.csv", "line 3", "column 'timestamp'", "'0'", "1970-01-01T00:00:00", "1970-01-03"],
    ),
    "created_at before 1970": (
        {"inter.csv": GOOD, "items.csv": "item_id,created_at\n10,2026-06-01\n11,1969-07-20\n"},
        ["items.csv", "line 3", "column 'created_at'", "outside the accepted"],
    ),
    "parquet timestamp column in 2200": (
        {
            "inter.parquet": pd.DataFrame(
                {
                    "user_id": [1, 2],
                    "item_id": [4, 5],
                    "timestamp": pd.to_datetime(["2026-07-01", "2200-01-01"], utc=True),
                    "event": ["view"] * 2,
                }
            )
        },
        ["inter.parquet", "row 2", "column 'timestamp'", "2200-01-01", "outside the accepted"],
    ),
    # Text ids are keys (docs/data.md "Ids"): "u7" is one, "u 7" (a space) is not.
    "invalid id": (
        {
            "inter.csv": _csv(
                ["1,2,2026-07-01,view", "u7,3,2026-07-01,view", "u 7,3,2026-07-01,view"]
            )
        },
        ["inter.csv", "line 4", "column 'user_id'", "'u 7'", "not a valid id", "A-Z a-z 0-9"],
    ),
    "id too long": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "u" * 65 + ",3,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'user_id'", "1..64 characters"],
    ),
    "control character in id": (
        {"inter.csv": _csv(["1,SKU-1,2026-07-01,view", "1,SKU\x072,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'item_id'", "'SKU\\x072'", "not a valid id"],
    ),
    "non-ASCII id": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "usér,3,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'user_id'", "'usér'", "A-Z a-z 0-9"],
    ),
    "signed id among keys": (
        {"inter.csv": _csv(["u1,2,2026-07-01,view", "+3,3,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'user_id'", "'+3'", "not a signed or decimal number"],
    ),
    "key and integer id collide": (
        {"inter.csv": _csv(["u1,2,2026-07-01,view", f"{key_hash('u1')},3,2026-07-01,view"])},
        ["inter.csv", "column 'user_id'", "'u1'", str(key_hash("u1")), "both map to internal id"],
    ),
    "unknown item key": (
        {
            "inter.csv": _csv(["1,SKU-1,2026-07-01,view", "1,SKU-9,2026-07-01,view"]),
            "items.csv": "item_id,category\nSKU-1,1\nSKU-2,2\n",
        },
        ["inter.csv", "line 3", "column 'item_id'", "items.csv"],
    ),
    "fractional id": (
        {"inter.csv": _csv(["1,2.5,2026-07-01,view"])},
        ["inter.csv", "line 2", "column 'item_id'"],
    ),
    "negative id": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "1,-3,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'item_id'", "'-3'"],
    ),
    "missing id": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", ",3,2026-07-01,view"])},
        ["inter.csv", "line 3", "column 'user_id'", "missing value"],
    ),
    "unknown event": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "1,2,2026-07-02,like"])},
        ["inter.csv", "line 3", "column 'event'", "'like'"],
    ),
    "non-numeric rating": (
        {
            "inter.csv": _csv(
                ["1,2,2026-07-01,4", "1,3,2026-07-01,good"], "user_id,item_id,timestamp,rating"
            )
        },
        ["inter.csv", "line 3", "column 'rating'", "'good'"],
    ),
    "unknown item": (
        {
            "inter.csv": _csv(
                ["1,10,2026-07-01,view", "1,11,2026-07-01,view", "2,99,2026-07-02,click"]
            ),
            "items.csv": "item_id,category\n10,1\n11,2\n",
        },
        ["inter.csv", "line 4", "column 'item_id'", "99", "items.csv"],
    ),
    "unknown user": (
        {
            "inter.csv": _csv(["1,10,2026-07-01,view", "5,11,2026-07-01,view"]),
            "users.csv": "user_id,country\n1,3\n",
        },
        ["inter.csv", "line 3", "column 'user_id'", "5", "users.csv"],
    ),
    "duplicate item": (
        {"inter.csv": GOOD, "items.csv": "item_id,price\n10,1.0\n11,2.0\n10,3.0\n"},
        ["items.csv", "line 4", "column 'item_id'", "duplicate"],
    ),
    "negative price": (
        {"inter.csv": GOOD, "items.csv": "item_id,price\n10,1.0\n11,-2\n"},
        ["items.csv", "line 3", "column 'price'"],
    ),
    "bad created_at": (
        {"inter.csv": GOOD, "items.csv": "item_id,created_at\n10,2026-06-01\n11,soon\n"},
        ["items.csv", "line 3", "column 'created_at'", "'soon'"],
    ),
    "ragged row": (
        {"inter.csv": _csv(["1,2,2026-07-01,view", "1,2,2026-07-01,view", "1,2"])},
        ["inter.csv", "line 4", "expected 4 fields, got 2"],
    ),
    "negative code": (
        {"inter.csv": GOOD, "items.csv": "item_id,category\n10,1\n11,-2\n"},
        ["items.csv", "line 3", "column 'category'", "'-2'"],
    ),
    "header only": (
        {"inter.csv": "user_id,item_id,timestamp,event\n"},
        ["inter.csv", "empty file"],
    ),
    "zero bytes": ({"inter.csv": ""}, ["inter.csv", "empty file"]),
    "empty items file": (
        {"inter.csv": GOOD, "items.csv": "item_id,category\n"},
        ["items.csv", "empty file"],
    ),
    "unknown extension": ({"inter.json": GOOD}, ["inter.json", "unknown file type"]),
    "parquet bad timestamp": (
        {
            "inter.parquet": pd.DataFrame(
                {
                    "user_id": [1, 2, 3],
                    "item_id": [4, 5, 6],
                    "timestamp": ["2026-07-01", "2026-07-02", "never"],
                    "event": ["view"] * 3,
                }
            )
        },
        ["inter.parquet", "row 3", "column 'timestamp'", "'never'"],
    ),
    "parquet negative id": (
        {
            "inter.parquet": pd.DataFrame(
                {
                    "user_id": [1, -2],
                    "item_id": [4, 5],
                    "timestamp": [1.78e9, 1.78e9],
                    "event": ["view"] * 2,
                }
            )
        },
        ["inter.parquet", "row 2", "column 'user_id'"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_refused_and_nothing_is_written(
    settings: Settings, tmp_path: Path, case: str
) -> None:
    files, fragments = ERRORS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # Some previous raw data that must survive the failed import unchanged.
    import_data(settings, _write(inputs / "previous.csv", GOOD))
    before = _state(settings.data_dir)
    paths = {}
    for name, content in files.items():
        path = inputs / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(path)
        else:
            _write(path, content)
        paths[name.split(".")[0]] = path
    with pytest.raises(UserError) as err:
        import_data(settings, paths["inter"], paths.get("items"), paths.get("users"))
    for fragment in fragments:
        assert fragment in str(err.value)
    assert _state(settings.data_dir) == before
    assert sorted(p.name for p in settings.data_dir.iterdir()) == ["raw"]


def test_missing_file_is_refused(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        import_data(settings, tmp_path / "nope.csv")
    assert not settings.raw_dir.exists()


def test_csv_import_with_ratings_and_mixed_timestamps(settings: Settings, tmp_path: Path) -> None:
    inter = _write(
        tmp_path / "ratings.csv",
        "User_ID, item_id ,timestamp,rating,ignored\n"
        "1,10,2026-07-01T00:00:00Z,5,x\n"
        "1,11,2026-07-01 02:00:00+02:00,4,x\n"  # = 00:00Z: ties sort by user, item
        "2,10,1782864000,3.5,x\n"  # 2026-07-01T00:00:00Z
        "2,12,1782864000.25,3,x\n"
        "3,11,2026-07-02,2.9,x\n"
        "3,12,2026-07-03T00:00:00.123456Z,0,x\n",
    )
    items = _write(
        tmp_path / "items.csv",
        "item_id,category,price,created_at\n"
        "10,Books,9.5,2026-06-01\n"
        "11,Toys,,\n"  # missing cells take defaults
        "12,Books,1,2026-08-01\n"  # after its first interaction: moved back
        "13,,2,2026-06-15\n",  # no interactions: kept
    )
    import_data(settings, inter, items)
    raw = read_raw(settings)
    i = raw.interactions
    assert list(i["event"]) == ["purchase", "purchase", "click", "click", "view", "view"]
    assert list(i["user_id"]) == [1, 1, 2, 2, 3, 3]
    assert list(i["item_id"]) == [10, 11, 10, 12, 11, 12]
    t0 = pd.Timestamp("2026-07-01T00:00:00Z")
    assert list(i["timestamp"][:4]) == [t0, t0, t0, t0 + pd.Timedelta(milliseconds=250)]
    assert i["timestamp"].iloc[5] == pd.Timestamp("2026-07-03T00:00:00.123456Z")
    it = raw.items.set_index("item_id")
    assert list(it.index) == [10, 11, 12, 13]
    assert list(it["category"]) == [1, 2, 1, 0]  # labels sorted: Books=1, Toys=2; 0 = unknown
    assert list(it["brand"]) == [0, 0, 0, 0]
    assert list(it["price"]) == [9.5, 0.0, 1.0, 2.0]
    assert it.loc[10, "created_at"] == pd.Timestamp("2026-06-01T00:00Z")
    assert it.loc[11, "created_at"] == t0  # first interaction
    assert it.loc[12, "created_at"] == t0 + pd.Timedelta(milliseconds=250)
    users = raw.users.set_index("user_id")
    assert list(users.index) == [1, 2, 3]
    assert users.loc[3, "signup_at"] == pd.Timestamp("2026-07-02T00:00Z")
    assert (users[["age_bucket", "country"]] == 0).all().all()
    meta = read_meta(settings)
    assert meta["source"] == "import:interactions=ratings.csv,items=items.csv"
    assert meta["n_items"] == 4 and meta["n_users"] == 3 and meta["n_categories"] == 3
    assert meta["events"] == {"view": 2, "click": 2, "purchase": 2}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_round_trip_of_generated_data(
    small_settings: Settings, settings: Settings, tmp_path: Path, fmt: str
) -> None:
    """Exporting the canonical tables and importing them back gives the same snapshot."""
    raw = read_raw(small_settings)
    paths = {}
    for name in ("interactions", "items", "users"):
        df = getattr(raw, name)
        paths[name] = tmp_path / f"{name}.{fmt}"
        if fmt == "csv":
            # pandas writes datetimes as "2026-07-01 00:00:00.123456+00:00" (ISO-8601).
            df.to_csv(paths[name], index=False)
        else:
            df.to_parquet(paths[name], index=False)
    import_data(settings, paths["interactions"], paths["items"], paths["users"])
    assert read_meta(settings)["snapshot"] == read_meta(small_settings)["snapshot"]
    back = read_raw(settings)
    pd.testing.assert_frame_equal(back.interactions, raw.interactions)
    pd.testing.assert_frame_equal(back.items, raw.items)
    pd.testing.assert_frame_equal(back.users, raw.users)


def test_parquet_native_types(settings: Settings, tmp_path: Path) -> None:
    """Integer ids, unix-second integers and naive datetimes (taken as UTC)."""
    path = tmp_path / "inter.parquet"
    pd.DataFrame(
        {
            "user_id": np.array([5, 6], dtype=np.int32),
            "item_id": np.array([7, 7], dtype=np.uint16),
            "timestamp": [1782864000, 1782864060],
            "event": ["view", "CLICK "],
        }
    ).to_parquet(path)
    users = tmp_path / "users.parquet"
    pd.DataFrame(
        {
            "user_id": [5, 6, 8],
            "country": ["DE", "FR", None],
            "signup_at": pd.to_datetime(["2026-01-01", None, "2026-02-01"]),
        }
    ).to_parquet(users)
    import_data(settings, path, users=users)
    raw = read_raw(settings)
    assert list(raw.interactions["event"]) == ["view", "click"]
    assert raw.interactions["timestamp"].iloc[1] == pd.Timestamp("2026-07-01T00:01:00Z")
    u = raw.users.set_index("user_id")
    assert list(u["country"]) == [1, 2, 0]
    assert u.loc[5, "signup_at"] == pd.Timestamp("2026-01-01T00:00Z")
    assert u.loc[6, "signup_at"] == pd.Timestamp("2026-07-01T00:01:00Z")  # first interaction
    assert u.loc[8, "signup_at"] == pd.Timestamp("2026-02-01T00:00Z")


def test_failed_write_leaves_previous_raw_data_and_no_temp_folder(
    small_settings: Settings, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_raw is the last step of generate and import: its own failures change nothing."""
    import exporters.raw_tables as rt

    import_data(settings, _write(tmp_path / "previous.csv", GOOD))
    before = _state(settings.data_dir)
    tables = read_raw(small_settings)
    # Inconsistent tables are refused before anything is written ...
    broken = rt.RawTables(tables.interactions, tables.items.iloc[1:], tables.users)
    with pytest.raises(UserError, match="missing from the items table"):
        rt.write_raw(settings, broken, source="test")
    assert _state(settings.data_dir) == before

    # ... and a failure after the files are written removes the temporary folder.
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(rt, "_meta", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        rt.write_raw(settings, tables, source="test")
    assert _state(settings.data_dir) == before
    assert sorted(p.name for p in settings.data_dir.iterdir()) == ["raw"]


SCALES = {
    # name: (ratings, the events they must become)
    "1-5 stars": ([1, 2, 3, 4, 5], "vvcpp"),
    "half stars": ([0.5, 2.5, 3, 3.5, 4, 5], "vvccpp"),
    "0-5, 0 = not rated": ([0, 2, 3, 4, 5], "vvcpp"),
    "1-10": ([1, 5, 6, 7, 8, 10], "vvccpp"),
    "1-10, lowest unused": ([4, 6, 10], "vcp"),
    "0/1 likes": ([0, 1, 1, 0], "vppv"),
    "one value (implicit)": ([1, 1, 1], "ccc"),
    "-10..10 (jokes)": ([-10, -3, 0, 4, 5, 10], "vvccpp"),
    # plays: scaled to the top (480, 360) almost nothing would be positive; median 1.5
    "play counts": ([1] * 6 + [2, 3, 5, 8, 40, 600], "vvvvvvcccppp"),
}


@pytest.mark.parametrize("scale", SCALES)
def test_ratings_become_events_by_their_scale(scale: str) -> None:
    """The 1-5 cut (>= 4 purchase, >= 3 click) wherever a rating scale is 1-5, and the same
    cut carried to other scales; never a file whose ratings all become views."""
    ratings, expected = SCALES[scale]
    r = np.asarray(ratings, dtype=float)
    cut = rating_cut(r)
    got = "".join("vcp"[c] for c in cut.events(r))
    assert got == expected, (scale, cut)
    assert cut.events(r)[r == r.max()].min() > 0  # the top rating is never a view


def test_public_rating_files_as_published(settings: Settings, tmp_path: Path) -> None:
    """MovieLens' tab-separated u.data and "::"-separated ratings.dat (no header line),
    ratings.csv's camelCase header, a quoted ";"-separated file, gzip: read as they are,
    with --columns for the header-less ones and --map for an item column by another name."""
    rows = [(196, 242, 3, 881250949), (186, 302, 5, 891717742), (22, 377, 1, 878887116)]
    want = {"view": 1, "click": 1, "purchase": 1}
    names = parse_columns("user_id, itemId,rating,timestamp")
    assert names == ["user_id", "item_id", "rating", "timestamp"]

    u_data = _write(tmp_path / "u.data", "".join("\t".join(map(str, r)) + "\n" for r in rows))
    import_data(settings, u_data, column_names=names)
    assert read_meta(settings)["events"] == want
    named = read_raw(settings).interactions
    # Without --columns: no header line, 4 numbers with a unix time last: MovieLens' order.
    import_data(settings, u_data)
    meta = read_meta(settings)
    assert meta["import_columns"]["interactions"]["assumed_order"] is True  # type: ignore[index]
    pd.testing.assert_frame_equal(read_raw(settings).interactions, named)
    # Other shapes are not guessed: a 4th column too small for a unix time, 5 columns, a
    # unix time where the rating would be.
    for text in ("1\t2\t3\t4\n", "196\t242\t3\t881250949\t7\n", "196\t242\t881250949\n"):
        odd = _write(tmp_path / "odd.data", text)
        first = r"odd.data: the first line \(.*\) holds values.*--columns"
        with pytest.raises(UserError, match=first):
            import_data(settings, odd)
    i = read_raw(settings).interactions
    assert sorted(i["user_id"]) == [22, 186, 196] and sorted(i["item_id"]) == [242, 302, 377]

    dat = tmp_path / "ratings.dat.gz"
    with gzip.open(dat, "wt") as f:
        f.write("".join("::".join(map(str, r)) + "\n" for r in rows))
    import_data(settings, dat, column_names=names)
    assert read_meta(settings)["events"] == want

    ml20 = _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n" + "".join(",".join(map(str, r)) + "\n" for r in rows),
    )
    import_data(settings, ml20)  # movieId is the one id column that is not the user's
    meta = read_meta(settings)
    assert meta["events"] == want
    cols = meta["import_columns"]["interactions"]  # type: ignore[index]
    assert cols["inferred"] == {"movie_id": "item_id"} and cols["mapped"] == {}
    maps = parse_column_maps(["interactions:movieId=item_id"])
    import_data(settings, ml20, column_maps=maps)
    assert read_meta(settings)["import_columns"]["interactions"]["mapped"] == {  # type: ignore[index]
        "movie_id": "item_id"
    }
    # Implicit feedback: user-item pairs, every row a click; a play count by its name.
    pairs = _write(
        tmp_path / "pairs.csv", "user_id,item_id,timestamp\n1,2,2026-07-01\n3,2,2026-07-02\n"
    )
    import_data(settings, pairs)
    meta = read_meta(settings)
    assert meta["events"] == {"view": 0, "click": 2, "purchase": 0}
    assert meta["rating_cut"]["rule"] == "no rating column: every row is a click"  # type: ignore[index]
    assert meta["seen_events"] == ["view", "click", "purchase"]
    plays = _write(
        tmp_path / "user_artists.dat", "userID\tartistID\tweight\n2\t51\t13883\n2\t52\t11690\n"
    )
    import_data(settings, plays)
    cols = read_meta(settings)["import_columns"]["interactions"]  # type: ignore[index]
    assert cols["inferred"] == {"artist_id": "item_id", "weight": "rating"}
    two = _write(tmp_path / "two.csv", "userId,movieId,genreId,rating\n1,2,3,4\n")
    with pytest.raises(UserError, match=r"missing column 'item_id'.*movie_id, genre_id.*--map"):
        import_data(settings, two)  # two candidates: the user says which
    amazon = _write(
        tmp_path / "amazon.csv",
        "reviewerID,asin,overall,unixReviewTime\n"
        "A2SUAM1J3GNN3B,0000013714,5.0,1393545600\nA14VAT5EAX3D9S,0000013714,4.0,1363392000\n",
    )
    import_data(settings, amazon)
    cols = read_meta(settings)["import_columns"]["interactions"]  # type: ignore[index]
    assert cols["inferred"] == {
        "reviewer_id": "user_id",
        "asin": "item_id",
        "overall": "rating",
        "unix_review_time": "timestamp",
    }
    assert read_meta(settings)["timestamps"] == {"source": "column timestamp"}

    quoted = _write(
        tmp_path / "ratings.txt",
        '"User-ID";"ISBN";"Book-Rating";"Time"\n'
        '"276725";"034545104X";"0";"2004-08-01"\n'
        '"276726";"0155061224";"5";"2004-08-02"\n'
        '"276727";"0446520802";"10";"2004-08-03"\n',
    )
    import_data(settings, quoted)  # ISBN, Book-Rating and Time say what they hold
    meta = read_meta(settings)
    assert meta["import_columns"]["interactions"]["inferred"] == {  # type: ignore[index]
        "isbn": "item_id",
        "book_rating": "rating",
        "time": "timestamp",
    }
    assert meta["events"] == {"view": 2, "click": 0, "purchase": 1}  # 0-10: >= 8, >= 6
    assert meta["id_keys"] == {"items": 1, "users": 0}  # 034545104X; digits stay integers

    ragged = _write(tmp_path / "bad.tsv", "1\t2\t3\t881250949\n1\t3\t4\n")
    with pytest.raises(UserError, match="line 2: expected 4 fields, got 3"):
        import_data(settings, ragged, column_names=names)
    bad = _write(tmp_path / "bad.data", "1\t2\t3\t881250949\n1\t3\tgood\t881250949\n")
    with pytest.raises(UserError, match="line 2, column 'rating'"):  # no header: line = row
        import_data(settings, bad, column_names=names)
    with pytest.raises(UserError, match="--columns names 3 columns, the file has 4"):
        import_data(settings, bad, column_names=names[:3])


def test_synthetic_times_keep_each_users_order_and_interleave_users() -> None:
    """A file without times: each user's events spread over the year before ``end`` in
    their order (file or a seeded shuffle), users interleaved, the same every time."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, 100, 5_000)
    end = pd.Timestamp("2026-06-01", tz="UTC")
    got = synthetic_times(users, "file", seed=1, end=end)
    assert np.array_equal(got, synthetic_times(users, "file", seed=1, end=end))
    assert not np.array_equal(got, synthetic_times(users, "file", seed=2, end=end))
    start_us, end_us = (end - pd.Timedelta(days=365)).value // 1000, end.value // 1000
    assert got.min() >= start_us and got.max() < end_us
    spans = []
    for u in np.unique(users):
        t = got[users == u]
        assert np.all(np.diff(t) > 0)  # file order is time order, no ties
        spans.append(t.max() - t.min())
    # ~50 events per user, drawn over the whole year: no user is squeezed into a corner.
    assert min(spans) > 0.8 * (end_us - start_us)

    shuffled = synthetic_times(users, "random", seed=1, end=end)
    assert np.array_equal(np.sort(shuffled), np.sort(got))  # the same draws, other order
    first = users == users[0]
    assert not np.all(np.diff(shuffled[first]) > 0)  # not the file's order
    with pytest.raises(UserError, match="time order 'latest'"):
        synthetic_times(users, "latest")

    # A user's rows for one item (a view, then a purchase) stay together, in file order.
    u = np.array([1, 1, 1, 1, 1, 1, 2, 2])
    i = np.array([5, 6, 5, 7, 6, 5, 5, 9])
    for seed in range(20):
        t = synthetic_times(u, "random", seed=seed, end=end, item_ids=i)
        by_time = np.argsort(t[:6])
        runs = [int(i[r]) for k, r in enumerate(by_time) if k == 0 or i[r] != i[by_time[k - 1]]]
        assert sorted(runs) == [5, 6, 7]  # each item one run
        for item in (5, 6):
            rows = np.flatnonzero(i[:6] == item)
            assert np.all(np.diff(t[rows]) > 0)


def test_a_ratings_file_without_timestamps_is_imported(settings: Settings, tmp_path: Path) -> None:
    """goodbooks-10k / Book-Crossing shape (user, item, rating; no time): imported with
    synthesized times, said so in meta.json; --time-order file keeps the file's order."""
    rows = [(u, 100 + (u * 7 + j) % 13, 1 + (u + j) % 5) for u in range(1, 30) for j in range(6)]
    text = "user_id,book_id,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows)
    inter = _write(tmp_path / "ratings.csv", text)
    maps = parse_column_maps(["interactions:book_id=item_id"])
    import_data(settings, inter, column_maps=maps)
    meta = read_meta(settings)
    today = pd.Timestamp.now("UTC").floor("D")
    assert meta["timestamps"] == {
        "source": "synthesized",
        "order": "random",
        "span_days": 365,
        "end": today.isoformat(),
    }
    assert meta["n_interactions"] == len(rows)
    assert "timestamp" in meta["import_columns"]["interactions"]["defaulted"]  # type: ignore[index]
    i = read_raw(settings).interactions
    assert i["timestamp"].min() >= today - pd.Timedelta(days=365)
    assert i["timestamp"].max() < today

    import_data(settings, inter, column_maps=maps, time_order="file")
    i = read_raw(settings).interactions.sort_values(["user_id", "timestamp"])
    assert list(zip(i["user_id"], i["item_id"], strict=True)) == [(u, it) for u, it, _ in rows]
    assert read_meta(settings)["timestamps"]["order"] == "file"  # type: ignore[index]

    with pytest.raises(UserError, match="--time-order 'newest'"):
        import_data(settings, inter, column_maps=maps, time_order="newest")
    timed = _write(tmp_path / "timed.csv", GOOD)
    with pytest.raises(UserError, match="--time-order is for a file without a timestamp"):
        import_data(settings, timed, time_order="file")
    assert read_meta(settings)["timestamps"]["order"] == "file"  # type: ignore[index]
    import_data(settings, timed)
    assert read_meta(settings)["timestamps"] == {"source": "column timestamp"}


def test_the_rating_cut_is_reported_and_can_be_given(settings: Settings, tmp_path: Path) -> None:
    """Implicit data written as ratings (all 1): every row a click, not a view (which left
    training without a positive); the cut in meta.json; --rating-cut overrides it."""
    rows = "".join(f"{u},{10 + u % 3},2026-07-0{1 + u % 5},1\n" for u in range(1, 9))
    inter = _write(tmp_path / "ratings.csv", "user_id,item_id,timestamp,rating\n" + rows)
    import_data(settings, inter)
    meta = read_meta(settings)
    assert meta["events"] == {"view": 0, "click": 8, "purchase": 0}
    assert meta["rating_cut"] == {
        "purchase": None,
        "click": 1.0,
        "rule": "one value (1): every rating is a click",
    }
    import_data(settings, inter, cut=RatingCut.parse("2,1"))
    assert read_meta(settings)["events"] == {"view": 0, "click": 8, "purchase": 0}
    import_data(settings, inter, cut=RatingCut.parse("1,1"))
    assert read_meta(settings)["events"] == {"view": 0, "click": 0, "purchase": 8}
    assert read_meta(settings)["rating_cut"]["rule"] == "given (--rating-cut)"  # type: ignore[index]
    for bad in ("4", "a,b", "3,4"):
        with pytest.raises(UserError, match="--rating-cut"):
            RatingCut.parse(bad)
    # Nothing to cut: events given, or user-item pairs without a rating.
    events = _write(
        tmp_path / "events.csv", "user_id,item_id,timestamp,event\n1,2,2026-07-01,click\n"
    )
    pairs = _write(tmp_path / "pairs.csv", "user_id,item_id,timestamp\n1,2,2026-07-01\n")
    for path, has in ((events, "an 'event' column"), (pairs, "no rating column")):
        with pytest.raises(UserError, match=f"--rating-cut applies to a rating column.*{has}"):
            import_data(settings, path, cut=RatingCut.parse("4,3"))


def test_extra_columns_are_reported_or_mapped(settings: Settings, tmp_path: Path) -> None:
    """A ratings file with user attributes outside the schema: each extra column is named
    as ignored in meta.json, or used through --map; ratings make every event "seen"."""
    inter = _write(
        tmp_path / "ratings.csv",
        "user_id,item_id,rating,timestamp\n1,10,5,2026-07-01\n2,11,2,2026-07-02\n",
    )
    users = _write(
        tmp_path / "users.csv", "user_id,age,gender,occupation\n1,24,M,writer\n2,53,F,doctor\n"
    )
    import_data(settings, inter, users=users)
    cols = read_meta(settings)["import_columns"]["users"]  # type: ignore[index]
    assert cols["ignored"] == ["age", "gender", "occupation"]
    assert cols["defaulted"] == ["age_bucket", "country", "signup_at"]
    assert read_meta(settings)["seen_events"] == ["view", "click", "purchase"]

    from exporters.data_import import parse_column_maps

    maps = parse_column_maps(["users:occupation=country", "users:gender=age_bucket"])
    import_data(settings, inter, users=users, column_maps=maps)
    cols = read_meta(settings)["import_columns"]["users"]  # type: ignore[index]
    assert cols["mapped"] == {"occupation": "country", "gender": "age_bucket"}
    assert cols["ignored"] == ["age"]
    countries = read_raw(settings).users.set_index("user_id")["country"]
    assert countries[1] != countries[2] and min(countries) >= 1  # labels became codes 1, 2
    with pytest.raises(UserError, match="no column 'zip'"):
        import_data(
            settings, inter, users=users, column_maps=parse_column_maps(["users:zip=country"])
        )
    with pytest.raises(UserError, match="not a column of users"):
        parse_column_maps(["users:age=height"])


def test_string_ids_are_hashed_and_their_keys_kept(settings: Settings, tmp_path: Path) -> None:
    """UUID users and SKU items beside integer ids: digits keep their value, keys become
    their documented hash, and the key tables name every key (docs/data.md "Ids")."""
    uuid_a, uuid_b = "550e8400-e29b-41d4-a716-446655440000", "6BA7B811-9DAD-11D1-80B4-00C04FD430C8"
    inter = _write(
        tmp_path / "inter.csv",
        _csv(
            [
                f"{uuid_a},SKU-1,2026-07-01,view",
                f"{uuid_b},sku/2@b:x+y_z,2026-07-02,click",
                "42, 7 ,2026-07-03,purchase",
                f" {uuid_a} ,SKU-1,2026-07-04,click",
            ]
        ),
    )
    items = _write(tmp_path / "items.csv", "item_id,category\nSKU-1,1\nsku/2@b:x+y_z,2\n7,1\n")
    import_data(settings, inter, items)
    raw = read_raw(settings)
    want_users = [key_hash(uuid_a), key_hash(uuid_b), 42, key_hash(uuid_a)]
    assert raw.interactions["user_id"].tolist() == want_users
    assert set(raw.items["item_id"]) == {key_hash("SKU-1"), key_hash("sku/2@b:x+y_z"), 7}
    item_keys = pd.read_parquet(settings.raw_dir / "item_keys.parquet")
    assert dict(zip(item_keys["item_key"], item_keys["item_id"], strict=True)) == {
        "SKU-1": key_hash("SKU-1"),
        "sku/2@b:x+y_z": key_hash("sku/2@b:x+y_z"),
    }
    user_keys = pd.read_parquet(settings.raw_dir / "user_keys.parquet")
    assert sorted(user_keys["user_key"]) == sorted([uuid_a, uuid_b])  # case is kept
    assert read_meta(settings)["id_keys"] == {"items": 2, "users": 2}


def test_integer_ids_write_no_key_tables(settings: Settings, tmp_path: Path) -> None:
    import_data(settings, _write(tmp_path / "inter.csv", GOOD))
    assert not list(settings.raw_dir.glob("*_keys.parquet"))
    assert "id_keys" not in read_meta(settings)
    assert read_raw(settings).interactions["user_id"].tolist() == [1, 2]


def test_folding_logged_events_in_keeps_the_key_tables(settings: Settings, tmp_path: Path) -> None:
    """``recstack data import-events`` rewrites the raw data: the clients' ids must stay
    named, or the next release would answer internal ids."""
    from datetime import UTC, datetime

    from exporters.event_import import import_events
    from orchestrator.event_log import EventLog, LogConfig
    from orchestrator.request import EventQuery

    inter = _csv(["u-1,SKU-1,2026-07-01,view", "u-2,SKU-2,2026-07-02,click"])
    import_data(settings, _write(tmp_path / "inter.csv", inter))
    before = {p.name: p.read_bytes() for p in settings.raw_dir.glob("*_keys.parquet")}
    assert sorted(before) == ["item_keys.parquet", "user_keys.parquet"]
    log = EventLog(LogConfig(settings.events_dir, flush_ms=10))
    log.event(
        EventQuery(key_hash("u-2"), key_hash("SKU-1"), "click", datetime(2026, 7, 3, tzinfo=UTC))
    )
    log.close()
    assert import_events(settings).added == 1
    after = {p.name: p.read_bytes() for p in settings.raw_dir.glob("*_keys.parquet")}
    assert after == before
    assert read_meta(settings)["id_keys"] == {"items": 2, "users": 2}


def test_request_context_columns_are_kept_or_refused(settings: Settings, tmp_path: Path) -> None:
    """``surface``/``device`` of an event (what cold-start context lists learn from):
    optional, trimmed, empty when missing; a value over 128 characters is refused."""
    header = "user_id,item_id,timestamp,event,surface,device"
    rows = ["1,10,2026-03-01T00:00:00Z,click, cart ,ios", "2,11,2026-03-02T00:00:00Z,view,,"]
    import_data(settings, _write(tmp_path / "inter.csv", _csv(rows, header)))
    inter = read_raw(settings).interactions
    assert inter[["surface", "device"]].values.tolist() == [["cart", "ios"], ["", ""]]
    import_data(settings, _write(tmp_path / "plain.csv", _csv(["1,10,2026-03-01T00:00:00Z,view"])))
    assert read_raw(settings).interactions[["surface", "device"]].values.tolist() == [["", ""]]
    bad = _write(
        tmp_path / "bad.csv", _csv([f"1,10,2026-03-01T00:00:00Z,view,{'x' * 129},"], header)
    )
    with pytest.raises(UserError, match=r"bad\.csv: line 2, column 'surface': longer than 128"):
        import_data(settings, bad)
