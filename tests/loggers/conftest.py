"""The `run_logged` fixture for the logger tests; the helpers live in `logger_runs`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from logger_runs import run_logged as _run_logged  # type: ignore[import-not-found]


@pytest.fixture()
def run_logged() -> Callable[..., Any]:
    return _run_logged
