"""Session fixtures of the deploy tests: helm, and the chart rendered once per set of values."""

from __future__ import annotations

import pytest

from tests.deploy.chart_render import VARIANTS, go_available, helm_binary, render


@pytest.fixture(scope="session")
def helm() -> str:
    found = helm_binary()
    if found is None:
        if not go_available():
            pytest.skip("helm is not installed and there is no Go toolchain to build it (infra/install.sh)")
        pytest.fail("helm not found: run `bash infra/install.sh` (it builds helm into ~/.cache/ugt/bin)")
    return found


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[dict]]:
    return {name: render(helm, values) for name, values in VARIANTS.items()}


@pytest.fixture(scope="session")
def default_objects(rendered: dict[str, list[dict]]) -> list[dict]:
    return rendered["default"]
