"""Small snapshots for checkpoint tests."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esper.leyline import CheckpointManifest
from esper.tolaria.checkpoint import WriteAheadLog
from esper.tolaria.checkpoint.layout import sha256_hex
from esper.tolaria.checkpoint.wal import RecordType
from esper.tolaria.state.snapshot import Snapshot


def make_state(seed: int = 0, width: int = 8) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {"fc.weight": torch.randn(width, width, generator=gen), "fc.bias": torch.zeros(width)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(width, generator=gen)}},
                      "param_groups": [{"lr": 0.01, "params": [0]}]},
        "kasmina": {"manifest": {"seeds": [{"seed_id": "s1", "stage": "BLENDING"}]}, "alpha": (0.25, [1, 2])},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "trainer": {"epoch": seed, "history": [1.5, 2.5], "note": None},
    }


def make_snapshot(step: int, epoch: int | None = None, width: int = 8) -> Snapshot:
    epoch = step // 10 if epoch is None else epoch
    return Snapshot(snapshot_id=f"snap-{step}", epoch=epoch, global_step=step, state=make_state(step, width))


def assert_state_equal(a: Any, b: Any) -> None:
    """Deep equality for nested tensors, numpy arrays and plain values (types included)."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


FORGED_TXN = 50  # newer than any transaction the tests' stores write


def forge_manifest(checkpoint: Path, edit: Callable[[CheckpointManifest], None], *, commit: bool = True) -> None:
    """Rewrite the checkpoint's manifest with `edit`; with `commit`, as a forger with write access
    could: as transaction FORGED_TXN, with a matching WAL COMMIT (the WAL is CRC only)."""
    path = checkpoint / "manifest.pb"
    manifest = CheckpointManifest()
    manifest.ParseFromString(path.read_bytes())
    edit(manifest)
    if commit:
        manifest.txn_id = FORGED_TXN
    data = manifest.SerializeToString(deterministic=True)
    path.write_bytes(data)
    if commit:
        wal = WriteAheadLog(checkpoint.parent, fsync=False)
        wal.append(RecordType.COMMIT, manifest.txn_id, 0, 0,
                   json.dumps({"checkpoint": checkpoint.name, "manifest_sha256": sha256_hex(data)}).encode())
        wal.close()
