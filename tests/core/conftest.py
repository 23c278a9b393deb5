"""The `make_trainer` fixture for the core-loop tests; the helpers live in `trainer_fixtures`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from trainer_fixtures import MemoryBus, small_config  # type: ignore[import-not-found]

from esper.tolaria.config import TolariaConfig


@pytest.fixture()
def make_trainer() -> Callable[..., Any]:
    from esper.tolaria.loop.build import build_trainer

    def make(config: TolariaConfig | None = None, **kwargs: Any) -> Any:
        bus = MemoryBus()
        trainer = build_trainer(config or small_config(), bus=bus, **kwargs)
        return trainer, bus

    return make
