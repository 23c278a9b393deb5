"""The committed generated code matches the .proto, and nothing outside Leyline mirrors its types."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from esper.leyline import pb

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
LEYLINE = SRC / "esper" / "leyline"


def test_generated_code_matches_a_fresh_regeneration(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{SRC}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         str(LEYLINE / "leyline.proto")],
        check=True, capture_output=True,
    )
    for name in ("leyline_pb2.py", "leyline_pb2.pyi"):
        fresh = (tmp_path / "esper" / "leyline" / name).read_text()
        committed = (LEYLINE / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def _leyline_names() -> set[str]:
    names = set(pb.DESCRIPTOR.message_types_by_name) | set(pb.DESCRIPTOR.enum_types_by_name)
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        names |= {v.name for v in enum.values}
    return names


def test_no_module_outside_leyline_defines_a_mirror_of_a_leyline_type() -> None:
    names = _leyline_names()
    enum_members = {n for n in names if n.isupper()}
    class_def = re.compile(r"^\s*class\s+(\w+)\s*(\(([^)]*)\))?\s*:", re.M)
    member_def = re.compile(r"^\s+([A-Z][A-Z0-9_]+)\s*=", re.M)
    offenders: list[str] = []
    for path in SRC.rglob("*.py"):
        if LEYLINE in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        for match in class_def.finditer(text):
            cls, bases = match.group(1), match.group(3) or ""
            if cls in names:
                offenders.append(f"{path.relative_to(ROOT)}: class {cls} shadows a Leyline type")
            if re.search(r"\b(Enum|IntEnum|StrEnum|Flag|IntFlag)\b", bases):
                # an Enum whose members spell Leyline enum values (with or without the prefix) is a mirror
                body = text[match.end():].split("\nclass ", 1)[0]
                members = set(member_def.findall(body))
                stripped = {m.split("_", 2)[-1] for m in enum_members} | {m.split("_", 1)[-1] for m in enum_members}
                clash = members & (enum_members | stripped)
                if len(clash) >= 3:
                    offenders.append(f"{path.relative_to(ROOT)}: enum {cls} mirrors Leyline values {sorted(clash)[:4]}")
    assert not offenders, "\n".join(offenders)


def test_the_mirror_scan_catches_a_planted_mirror(tmp_path: Path) -> None:
    # Guard against a scan that can never fail: the same rules flag an obvious mirror.
    planted = "from enum import IntEnum\nclass Stage(IntEnum):\n    DORMANT = 1\n    GERMINATED = 2\n    TRAINING = 3\n"
    members = set(re.findall(r"^\s+([A-Z][A-Z0-9_]+)\s*=", planted, re.M))
    stripped = {n.split("_", 2)[-1] for n in _leyline_names() if n.isupper()}
    assert len(members & stripped) >= 3
