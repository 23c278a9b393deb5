#!/usr/bin/env python3
"""Mutation testing of the safety-critical modules with mutmut (docs/MUTATION.md).

    python scripts/mutation.py                    # every module in mutation.toml
    python scripts/mutation.py --since main~3     # the modules whose code or tests changed since a commit
    python scripts/mutation.py --only checkpoint_wal oona_signing

Each module runs in its own work directory (build/mutation/<name>/): a pyproject.toml that is
the project's plus a [tool.mutmut] section mutating that one file against that module's tests.
PYTHONPATH points at mutmut's copy of src/, so the subprocesses a test spawns import the mutant
too. The table printed at the end counts each module's mutants as killed / survived /
timed out / no tests (no listed test reaches the function: a survivor too). Left out of the
score: equivalent mutants named in mutation.toml (each with its reason), and wording mutants,
which only rewrite the prose of a message (a string literal with a space in it, wrapped in XX or
changed in case): tests match a message's key phrase, not every word of it. The strict score
counts wording survivors as survivors. Each module's surviving diffs go to
build/mutation/<name>/survivors.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mutation.toml"
WORK = ROOT / "build" / "mutation"
# Repository paths a test may read beside its own directory (examples, helper scripts).
ALSO_COPY = ["examples", "scripts"]
MODULE_KEYS = {"path", "tests", "equivalent", "needs_cuda"}
# mutmut's own statuses, folded into the columns of the report.
COLUMNS = {
    "killed": "killed",
    "caught by type check": "killed",
    "survived": "survived",
    "timeout": "timeout",
    "no tests": "no_tests",
    "skipped": "other",
    "suspicious": "other",
    "segfault": "other",
    "not checked": "other",
    "check was interrupted by user": "other",
}


class ConfigError(SystemExit):
    """A one-line error about mutation.toml or the command line; the run does not start."""


@dataclass
class Module:
    name: str
    path: str
    tests: list[str]
    equivalent: dict[str, str] = field(default_factory=dict)
    # functions only a CUDA device reaches (mutmut's mangled names, e.g. "x__host_copy"): their
    # mutants cannot be tested on a CPU machine and are counted under "other", not as survivors
    needs_cuda: list[str] = field(default_factory=list)

    def reaches_only_on_cuda(self, mutant: str) -> bool:
        return any(f".{fn}__mutmut_" in mutant for fn in self.needs_cuda)


@dataclass
class Score:
    module: str
    counts: dict[str, int]
    survivor_kinds: dict[str, str]  # every mutant not killed: survived / no tests / wording / equivalent
    stale_equivalents: list[str]
    diffs: dict[str, str] = field(default_factory=dict)

    @property
    def survivors(self) -> list[str]:
        """The survivors that count against the score."""
        return [n for n, kind in self.survivor_kinds.items() if kind in ("survived", "no tests")]

    @property
    def score(self) -> float:
        """Killed share of the mutants that can change behaviour (equivalent and wording left out)."""
        return self._share(("equivalent", "wording", "other"))

    @property
    def strict_score(self) -> float:
        """The same with wording survivors counted as survivors."""
        return self._share(("equivalent", "other"))

    def _share(self, left_out: tuple[str, ...]) -> float:
        judged = sum(self.counts.values()) - sum(self.counts[k] for k in left_out)
        return 100.0 * (self.counts["killed"] + self.counts["timeout"]) / judged if judged else 100.0


def load_modules(config: Path = CONFIG) -> list[Module]:
    """The modules of mutation.toml in file order; every path must exist."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"mutation: cannot read {config}: {exc}") from exc
    modules = []
    for name, entry in data.get("modules", {}).items():
        unknown = set(entry) - MODULE_KEYS
        if unknown:
            raise ConfigError(
                f"mutation: [modules.{name}] has unknown keys {sorted(unknown)}; use {sorted(MODULE_KEYS)}")
        if "path" not in entry or not entry.get("tests"):
            raise ConfigError(f"mutation: [modules.{name}] needs `path` and a non-empty `tests` list")
        for path in [entry["path"], *(t.split("::")[0] for t in entry["tests"])]:
            if not (ROOT / path).exists():
                raise ConfigError(f"mutation: [modules.{name}] names {path}, which does not exist; fix the path")
        modules.append(Module(name, entry["path"], list(entry["tests"]), dict(entry.get("equivalent", {})),
                              list(entry.get("needs_cuda", []))))
    if not modules:
        raise ConfigError(f"mutation: {config} lists no [modules.*]")
    return modules


def changed_since(commit: str) -> set[str]:
    """Paths changed between `commit` and the working tree (committed or not)."""
    result = subprocess.run(
        ["git", "diff", "--name-only", commit, "--"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ConfigError(f"mutation: git cannot diff against {commit!r}: {result.stderr.strip()}; name a commit")
    return set(result.stdout.split())


def select(modules: list[Module], only: list[str] | None, since: str | None) -> list[Module]:
    if only:
        known = {m.name for m in modules}
        missing = [n for n in only if n not in known]
        if missing:
            raise ConfigError(f"mutation: unknown module(s) {missing}; known: {sorted(known)}")
        modules = [m for m in modules if m.name in only]
    if since is not None:
        changed = changed_since(since)
        modules = [m for m in modules if m.path in changed or any(t.split("::")[0] in changed for t in m.tests)]
    return modules


def mutmut_section(module: Module) -> str:
    tests = ", ".join(json.dumps(t) for t in module.tests)
    also = ", ".join(json.dumps(p) for p in ALSO_COPY)
    # forkserver: mutmut's main process stays free of torch, whose threads do not survive a fork.
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{json.dumps(module.path)}]\n"
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:randomly", "-q"]\n'
        f"also_copy = [{also}]\n"
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        # A hung mutant (a lost notify, a wait that never ends) is cut at about 3x its tests' time.
        "timeout_multiplier = 6.0\n"
    )


def prepare(module: Module) -> Path:
    """A fresh work directory whose pyproject.toml mutates only this module."""
    work = WORK / module.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ["src", "tests", *ALSO_COPY]:
        (work / name).symlink_to(ROOT / name)
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if "[tool.mutmut]" in project:
        raise ConfigError(
            "mutation: pyproject.toml has its own [tool.mutmut]; the per-module config lives in mutation.toml")
    (work / "pyproject.toml").write_text(project + mutmut_section(module), encoding="utf-8")
    # PYTHONPATH names mutants/src; a directory missing when Python starts is never searched again.
    (work / "mutants" / "src").mkdir(parents=True)
    return work


def run_module(module: Module, max_children: int, *, rerun: bool = True) -> Score:
    """Mutate `module` in a fresh work directory (or, with rerun=False, score the last run's)."""
    work = prepare(module) if rerun else WORK / module.name
    env = dict(os.environ)
    # Subprocesses a test starts import the mutated copy, and inherit MUTANT_UNDER_TEST.
    env["PYTHONPATH"] = os.pathsep.join([str(work / "mutants" / "src"), *filter(None, [env.get("PYTHONPATH")])])
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    log = work / "run.log"
    if rerun:
        print(f"== {module.name}: {module.path} against {len(module.tests)} test file(s); log {log}", flush=True)
        with log.open("w") as out:
            subprocess.run([mutmut, "run", "--max-children", str(max_children)],
                           cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    elif not log.exists():
        raise ConfigError(f"mutation: {module.name} has no earlier run in {work}; run it without --no-run")
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    statuses = parse_results(listing.stdout)
    if not statuses:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"mutation: mutmut produced no results for {module.name}; end of {log}:\n{tail}")
    diffs = {name: show(mutmut, work, env, name) for name, status in statuses.items()
             if COLUMNS.get(status) in ("survived", "no_tests")}
    result = score(module, statuses, diffs)
    (work / "survivors.txt").write_text(
        "".join(f"# {name} [{kind}]\n{diffs[name]}\n" for name, kind in result.survivor_kinds.items()))
    return result


def show(mutmut: str, work: Path, env: dict[str, str], name: str) -> str:
    """The diff of one mutant against the original (mutmut show), without its header line."""
    shown = subprocess.run([mutmut, "show", name], cwd=work, env=env, capture_output=True, text=True)
    return "\n".join(line for line in shown.stdout.splitlines() if not line.startswith("# "))


_STRING = re.compile(r"""[rRbBuU]?("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


def is_wording(diff: str) -> bool:
    """True when the mutant only rewrites message prose: the one changed line differs from the
    original only inside string literals, each with a space in it, wrapped in XX or re-cased."""
    old = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    new = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if len(old) != 1 or len(new) != 1:
        return False
    if _STRING.sub('""', old[0]) != _STRING.sub('""', new[0]):
        return False
    pairs = [(a, b) for a, b in zip(_STRING.findall(old[0]), _STRING.findall(new[0]), strict=False) if a != b]
    return bool(pairs) and all(
        " " in a[1:-1] and b[1:-1] in ("XX" + a[1:-1] + "XX", a[1:-1].upper(), a[1:-1].lower()) for a, b in pairs
    )


_RESULT = re.compile(r"^\s+(\S+): (.+)$")


def parse_results(text: str) -> dict[str, str]:
    """`mutmut results --all true` lines (`    <mutant>: <status>`) as {mutant: status}."""
    return {m.group(1): m.group(2).strip() for line in text.splitlines() if (m := _RESULT.match(line))}


def score(module: Module, statuses: dict[str, str], diffs: dict[str, str]) -> Score:
    counts = dict.fromkeys(["killed", "survived", "timeout", "no_tests", "wording", "equivalent", "other"], 0)
    kinds: dict[str, str] = {}
    for name, status in sorted(statuses.items()):
        column = COLUMNS.get(status, "other")
        if column in ("survived", "no_tests"):
            if name in module.equivalent:
                column = "equivalent"
            elif is_wording(diffs.get(name, "")):
                column = "wording"
            elif column == "no_tests" and module.reaches_only_on_cuda(name):
                column = "other"
            kinds[name] = {"no_tests": "no tests", "other": "needs CUDA"}.get(column, column)
        counts[column] += 1
    stale = sorted(n for n in module.equivalent if COLUMNS.get(statuses.get(n, ""), "") not in ("survived", "no_tests"))
    return Score(module.name, counts, kinds, stale, diffs)


def report(scores: list[Score]) -> str:
    head = (f"{'module':<20}{'mutants':>8}{'killed':>7}{'survived':>9}{'timeout':>8}{'no tests':>9}{'wording':>8}"
            f"{'equiv':>6}{'other':>6}{'score':>8}{'strict':>8}")
    lines = [head]
    for s in scores:
        c = s.counts
        lines.append(
            f"{s.module:<20}{sum(c.values()):>8}{c['killed']:>7}{c['survived']:>9}{c['timeout']:>8}{c['no_tests']:>9}"
            f"{c['wording']:>8}{c['equivalent']:>6}{c['other']:>6}{s.score:>7.1f}%{s.strict_score:>7.1f}%"
        )
    for s in scores:
        for name in s.survivors:
            lines.append(f"  survivor {s.module}: {name} (diff in build/mutation/{s.module}/survivors.txt)")
        for name in s.stale_equivalents:
            lines.append(f"  stale equivalent in mutation.toml [{s.module}]: {name} is no longer a survivor")
    return "\n".join(lines)


def changed_line(diff: str) -> str:
    """The mutant's first changed line, stripped, for a one-line listing."""
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    return (added or [f"removed: {removed[0]}" if removed else ""])[0].replace("`", "'")


def markdown(scores: list[Score], modules: list[Module]) -> str:
    """The scores table and the equivalent mutants with their reasons, for docs/MUTATION.md."""
    by_name = {m.name: m for m in modules}
    lines = ["| module | file | mutants | killed | timed out | survived | no tests | wording | equivalent | score "
             "| strict |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in scores:
        c = s.counts
        lines.append(f"| {s.module} | `{by_name[s.module].path}` | {sum(c.values())} | {c['killed']} | {c['timeout']} "
                     f"| {c['survived']} | {c['no_tests']} | {c['wording']} | {c['equivalent']} | {s.score:.1f} % "
                     f"| {s.strict_score:.1f} % |")
    for s in scores:
        equivalent = [n for n, kind in s.survivor_kinds.items() if kind == "equivalent"]
        if equivalent:
            lines += ["", f"**{s.module}** equivalent mutants:", ""]
            reasons = by_name[s.module].equivalent
            lines += [f"- `{n.rsplit('.', 1)[-1]}` `{changed_line(s.diffs.get(n, ''))}`: {reasons[n]}"
                      for n in equivalent]
        if s.survivors:
            lines += ["", f"**{s.module}** surviving mutants:", ""]
            lines += [f"- `{n.rsplit('.', 1)[-1]}` ({s.survivor_kinds[n]}) `{changed_line(s.diffs.get(n, ''))}`"
                      for n in s.survivors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="module names from mutation.toml")
    parser.add_argument("--since", metavar="COMMIT", help="only modules whose code or tests changed since COMMIT")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--fail-under", type=float, default=95.0, help="exit 1 if a module scores below (percent)")
    parser.add_argument("--json", type=Path, help="also write the scores here")
    parser.add_argument("--no-run", action="store_true", help="score the last run of each module again")
    parser.add_argument("--markdown", type=Path, help="also write the tables of docs/MUTATION.md here")
    args = parser.parse_args(argv)
    modules = select(load_modules(), args.only, args.since)
    if not modules:
        print("mutation: no listed module changed; nothing to run")
        return 0
    os.nice(19)  # the rest of the machine keeps its cores
    scores = [run_module(m, args.max_children, rerun=not args.no_run) for m in modules]
    print(report(scores))
    if args.json:
        args.json.write_text(json.dumps([{"module": s.module, **s.counts, "score": round(s.score, 2),
                                          "strict_score": round(s.strict_score, 2), "not_killed": s.survivor_kinds}
                                         for s in scores], indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(scores, modules))
    return 1 if any(s.score < args.fail_under for s in scores) else 0


if __name__ == "__main__":
    sys.exit(main())
