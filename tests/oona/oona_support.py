"""Helpers shared by the Oona tests (not fixtures: plain values and functions)."""

from __future__ import annotations

import uuid

from esper.oona import StreamNames

SECRET = b"test-secret-not-for-production"


def unique_streams() -> StreamNames:
    """Stream names no other test uses, so tests can share one redis-server."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return StreamNames(normal=f"{prefix}.normal", telemetry=f"{prefix}.telemetry", emergency=f"{prefix}.emergency",
                       policy=f"{prefix}.policy", deadletter=f"{prefix}.deadletter")
