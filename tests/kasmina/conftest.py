"""Fixtures for Kasmina tests."""

from __future__ import annotations

import pytest
import torch

from esper.kasmina import KasminaLayer

from .helpers import make_layer


@pytest.fixture()
def layer() -> KasminaLayer:
    torch.manual_seed(0)
    return make_layer()
