"""Read-only views for `tolaria inspect`, and the helper of the drill that corrupts the newest checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from esper.tolaria.checkpoint.best import ranked_best
from esper.tolaria.checkpoint.layout import (
    MODEL_FILE,
    STATE_FILE,
    is_checkpoint_name,
    is_real_dir,
    load_state_file,
    step_of,
)
from esper.tolaria.checkpoint.recovery import (
    CheckpointNotFound,
    CommitEntry,
    checkpoint_dirs,
    committed_index,
    verify_checkpoint,
)
from esper.tolaria.checkpoint.wal import replay, segment_paths


def list_checkpoints(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every checkpoint dir under `directory`, newest first (by txn, then step), verified against the WAL.

    Each entry: name, path, epoch, step, txn (also as txn_id), committed, size_bytes, files
    {name: size}, seeds [{seed_id, stage}], status ("ok", "uncommitted", or "corrupt: <file> <problem>"),
    best (None, or {rank, metric, mode, value, epoch} when `checkpoint.keep_best` keeps it; `epoch` is
    the finished epoch the value is of, numbered from 0).
    """
    root = Path(directory)
    commits = {e.name: e for e in committed_index(replay(root).records)}
    dirs = checkpoint_dirs(root)
    ranks = {e.name: rank for rank, e in enumerate(ranked_best(commits[p.name] for p in dirs if p.name in commits), 1)}
    described = [{**_describe(path, commits.get(path.name)), "best": _best(commits.get(path.name), ranks)}
                 for path in dirs]
    return sorted(described, key=lambda c: (c["txn"] or 0, c["step"]), reverse=True)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Checkpoints of a run dir, a checkpoints dir, or one checkpoint dir, plus the WAL's health.

    Raises FileNotFoundError when `path` is none of those (nothing to inspect is an error, not an
    empty table)."""
    target = Path(path)
    usage = "pass a run dir, its checkpoints/ dir or a ckpt-* dir"
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist; {usage}")
    if (target / "checkpoints").is_dir():
        target = target / "checkpoints"
    only = target.name if is_checkpoint_name(target.name) and is_real_dir(target) else None
    root = target.parent if only else target
    if only is None and not checkpoint_dirs(root) and not segment_paths(root):
        raise FileNotFoundError(f"{target} holds no checkpoint and no write-ahead log; {usage}")
    replayed = replay(root)
    checkpoints = [c for c in list_checkpoints(root) if only is None or c["name"] == only]
    return {
        "directory": str(root),
        "checkpoints": checkpoints,
        "wal": {"segments": sorted({r.segment for r in replayed.records}), "records": len(replayed.records),
                "events": replayed.events},
    }


def corrupt_latest(directory: str | os.PathLike[str], file_name: str = MODEL_FILE) -> Path:
    """Flip one byte in the middle of `file_name` of the newest committed checkpoint (a drill).

    Returns the corrupted file. Raises CheckpointNotFound if nothing is committed."""
    root = Path(directory)
    entries = [e for e in committed_index(replay(root).records) if (root / e.name).is_dir()]
    if not entries:
        raise CheckpointNotFound(f"no committed checkpoint in {root} to corrupt; save one first")
    victim = root / entries[0].name / file_name
    with open(victim, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            raise CheckpointNotFound(f"{victim} is empty; nothing to corrupt")
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return victim


def _best(commit: CommitEntry | None, ranks: dict[str, int]) -> dict[str, Any] | None:
    if commit is None or commit.best is None or commit.name not in ranks:
        return None
    return {"rank": ranks[commit.name], **{k: v for k, v in commit.best.as_dict().items() if k != "top_k"}}


def _describe(path: Path, commit: CommitEntry | None) -> dict[str, Any]:
    verification = verify_checkpoint(path, commit)
    manifest = verification.manifest
    info: dict[str, Any] = {
        "name": path.name, "path": str(path), "committed": commit is not None,
        "txn": manifest.txn_id if manifest else None,
        "txn_id": manifest.txn_id if manifest else None,
        "epoch": manifest.epoch if manifest else None,
        "step": manifest.global_step if manifest else step_of(path.name),
        "files": {f.name: f.size_bytes for f in manifest.files} if manifest else {},
        "size_bytes": sum(f.size_bytes for f in manifest.files) if manifest else 0,
        "seeds": [],
    }
    if commit is None:
        info["status"] = "uncommitted"
    elif not verification.ok:
        info["status"] = f"corrupt: {verification.problem}"
    else:
        info["status"] = "ok"
        info["seeds"] = _seeds(path / STATE_FILE)
    return info


def _seeds(state_file: Path) -> list[dict[str, Any]]:
    state = load_state_file(state_file)
    manifest = state.get("kasmina", {}).get("manifest", {}) if isinstance(state, dict) else {}
    seeds = manifest.get("seeds", []) if isinstance(manifest, dict) else []
    return [{"seed_id": s.get("seed_id"), "stage": s.get("stage")} for s in seeds if isinstance(s, dict)]
