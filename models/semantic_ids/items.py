"""One canonical item record, whichever way an item arrives.

Offline the builder reads `load_dataset(...).items` rows (item_id, title, year, genres); online the
Flink item job sees `schemas/item_event.avsc` records (item_id, title, description, categories,
attributes={"year": "1995", ...}). Both go through :func:`canonical_item`, so an item gets the same
embedding, and so the same semantic ID, on either path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

DEFAULT_TEXT_TEMPLATE = "{title} ({year}): {genres}"


class ItemError(ValueError):
    """An item record the encoders cannot use (says which item and why)."""


# Feast stores the year as Int64: a larger one would fail the write of the item job's whole batch
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _year(value: Any) -> int | None:
    """The year as an int, or None when there is none usable (missing, NaN, ±inf, text, beyond Int64)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        text = str(value).strip()
        if not text or text.lower() in ("nan", "<na>", "none"):
            return None
        year = int(float(text))
    except (TypeError, ValueError, OverflowError):  # int(float("inf")) raises OverflowError
        return None
    return year if INT64_MIN <= year <= INT64_MAX else None


def canonical_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """item_id, title, year (int|None), genres (list[str]), description, attributes (dict[str, str])."""
    if not isinstance(item, Mapping):
        raise ItemError(f"an item must be a mapping, got {type(item).__name__}")
    item_id = item.get("item_id")
    if item_id is None or str(item_id) == "":
        raise ItemError(f"item has no item_id: {dict(item)!r:.200}")
    attributes = {str(k): str(v) for k, v in dict(item.get("attributes") or {}).items()}
    genres = item.get("genres")
    if genres is None or (isinstance(genres, float) and math.isnan(genres)):
        genres = item.get("categories")
    genres = [str(g) for g in (list(genres) if genres is not None else [])]
    year = _year(item.get("year"))
    if year is None:
        year = _year(attributes.get("year"))
    if year is not None:
        attributes.setdefault("year", str(year))
    return {
        "item_id": str(item_id),
        "title": str(item.get("title") or ""),
        "year": year,
        "genres": genres,
        "description": str(item.get("description") or ""),
        "attributes": attributes,
    }


def item_text(item: Mapping[str, Any], template: str = DEFAULT_TEXT_TEMPLATE) -> str:
    """Text for the text encoder: "title (year): genre, genre" by default; missing parts drop out cleanly."""
    c = canonical_item(item)
    text = template.format(
        title=c["title"],
        year="" if c["year"] is None else c["year"],
        genres=", ".join(c["genres"]),
        description=c["description"],
        item_id=c["item_id"],
    )
    # a missing year leaves "Title (): ..." behind; tidy it so it reads like the other items
    text = text.replace(" ()", "").replace("()", "").strip()
    if text.endswith(":"):
        text = text[:-1].rstrip()
    return text


def has_free_text(item: Mapping[str, Any], template: str = DEFAULT_TEXT_TEMPLATE) -> bool:
    """Whether the item has the free text (title, description) its text template uses.

    An item without it is not text-embedded at all (its text part stays zero, which fusion treats as missing),
    so its semantic ID comes from the structured features alone instead of from an embedding of "(): genres" or
    of its id string. A template that uses no free-text field embeds every item.
    """
    fields = [f for f in ("title", "description") if "{" + f + "}" in template]
    if not fields:
        return True
    c = canonical_item(item)
    return any(c[f].strip() for f in fields)


def items_from_frame(frame: Any) -> list[dict[str, Any]]:
    """Rows of a pandas DataFrame (load_dataset(...).items) as canonical item dicts."""
    missing = {"item_id", "title"} - set(frame.columns)
    if missing:
        raise ItemError(f"items frame lacks column(s) {sorted(missing)}; has {list(frame.columns)}")
    return [canonical_item(row) for row in frame.to_dict("records")]
