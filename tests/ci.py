"""CI never goes green by skipping: a missing tool is a failure there.

CI (``CI=true``, see ``.ci/run``) installs every system package the tests
use; on a developer's machine a missing one only skips its tests.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def needs_tool(path: str | None, what: str) -> pytest.MarkDecorator:
    """Skip without ``path`` (fail in CI, where the test runs and asserts it)."""
    return pytest.mark.skipif(path is None and not in_ci(), reason=f"{what} is not installed")
