"""Fixtures for the semantic-ID tests; the helpers live in sid_synthetic.py."""

from __future__ import annotations

import pytest
from sid_synthetic import make_items


@pytest.fixture
def items() -> list[dict]:
    return make_items(120)
