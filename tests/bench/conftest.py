"""Fixtures the bench tests share with the serving tests: the tiny UGT trained once per test module."""

from tests.serving.conftest import trained  # noqa: F401
