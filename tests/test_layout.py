"""The sizes the architecture promises: no source file over 600 lines, the trainer within 300."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "esper"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_source_file_is_over_600_lines() -> None:
    long = {str(p.relative_to(SRC)): _lines(p) for p in SRC.rglob("*.py")
            if not p.name.endswith("_pb2.py") and _lines(p) > 600}  # generated protobuf code aside
    assert long == {}


def test_the_trainer_stays_within_300_lines() -> None:
    assert _lines(SRC / "tolaria" / "loop" / "trainer.py") <= 300
