"""The `tolaria` command: run, resume, inspect, report, bench, watch, drills."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper import __version__
from esper.oona.errors import SecretMissing

if TYPE_CHECKING:
    from esper.tolaria.drills import FaultPlan

INSPECT_FORMAT = "tolaria.inspect/1"


def _parser(figures: str = "") -> argparse.ArgumentParser:
    """The command line; `figures`, the bench figure names `bench --only` lists in its help."""
    p = argparse.ArgumentParser(prog="tolaria", description="Tolaria: the training orchestrator of Esper.")
    p.add_argument("--version", action="version", version=f"tolaria {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a job from a TOML config and write RUN_DIR/summary.json")
    run.add_argument("config", type=Path, help="TOML config, e.g. examples/digits.toml")
    run.add_argument("--run-dir", type=Path, default=None,
                     help="output folder (default runs/<name>); a folder holding files needs --resume or --overwrite")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="RUN_DIR holds a run: continue it, as `tolaria resume`")
    existing.add_argument("--overwrite", action="store_true",
                          help="RUN_DIR holds a run: replace it (deleted only once the new run has been built)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value (repeatable), typed by the schema: --set optimizer.lr=0.01 "
                     "--set model.hidden=[32,16] --set model.kwargs.width=64 --set run.precision=bf16; values are "
                     "TOML literals, a bare word is a string (quote a string that looks like a number: '\"7\"')")
    run.add_argument("--name", default=None, help="override run.name")
    run.add_argument("--seed", type=int, default=None, help="override run.seed")
    run.add_argument("--epochs", type=int, default=None, help="override run.epochs")
    run.add_argument("--no-morphogenesis", action="store_true", help="train the host alone (no growth)")
    run.add_argument("--inject", action="append", default=[], metavar="KIND@epoch=N[,step=M][,rank=R]",
                     help="fault drill (repeatable): at epoch N (counted from 0, as the console counts), at batch M "
                     "of that epoch if given, on torchrun rank R only if given (default: every rank); `tolaria "
                     "drills` lists the kinds")
    run.add_argument("--oona", default=None, metavar="redis://HOST:PORT/DB", help="publish over Redis Streams")
    run.add_argument("--remote-tamiyo", action="store_true", help="ask a `tamiyo serve` worker over --oona")
    run.add_argument("--profile", action="store_true", help="record spans and write RUN_DIR/trace.json")
    run.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    resume = sub.add_parser("resume", help="continue a run from its newest valid committed checkpoint")
    resume.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run directory written by `tolaria run` (it holds config.json and checkpoints/)")
    resume.add_argument("--from", dest="checkpoint", default=None, metavar="CHECKPOINT",
                        help="branch from this committed checkpoint (ckpt-... as `tolaria inspect` lists it, "
                             "or its path), or `best`: the best one checkpoint.keep_best kept")
    resume.add_argument("--run-dir", dest="into", type=Path, default=None, metavar="NEW_DIR",
                        help="continue into this folder (absent or empty; gets RUN_DIR's config.json), not RUN_DIR")
    resume.add_argument("--overwrite", action="store_true", help="NEW_DIR holds a run: replace it")
    resume.add_argument("--epochs", type=_epoch_count, default=None, metavar="N",
                        help="train up to this many epochs in total (default: the run's run.epochs); raise it to "
                        "train a finished run further")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    resume.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")

    inspect = sub.add_parser("inspect", help="list and verify the checkpoints of a run or one checkpoint")
    inspect.add_argument("path", type=Path, metavar="PATH",
                         help="a run directory, its checkpoints/ folder, or one ckpt-* folder")
    inspect.add_argument("--json", action="store_true",
                         help=f"print JSON instead of a table ({INSPECT_FORMAT}, see `_inspect_json`)")

    report = sub.add_parser("report", help="write RUN_DIR/report/index.html with plots; with several runs, "
                            "one page comparing them")
    report.add_argument("run_dir", type=Path, nargs="+", metavar="RUN_DIR",
                        help="a run directory (several: a comparison of those runs)")
    report.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where a comparison is written (default: FIRST_RUN/report/compare)")

    study = sub.add_parser("study", help="does growth pay? per seed: the host alone, the grown run, and the grown "
                           "architecture trained statically from step 0, compared per unit of training FLOPs")
    study.add_argument("config", type=Path, help="TOML or YAML config of the grown run, e.g. examples/digits_cnn.toml")
    study.add_argument("--seeds", default="0-4", help="seeds to run: 0-4, 0,2,5 or 3 (default 0-4)")
    study.add_argument("--json", type=Path, required=True, metavar="OUT", help="where the study is written")
    study.add_argument("--run-root", type=Path, default=None, metavar="DIR",
                       help="where the runs go, RUN_ROOT/seed<N>/{host,grown,static} (default runs/study-<name>)")
    study.add_argument("--epochs", type=int, default=None, help="override run.epochs in every arm")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value in every arm (repeatable), as `tolaria run --set`")

    bench = sub.add_parser("bench", help="measure every performance figure against its goal")
    bench.add_argument("--quick", action="store_true", help="small sizes and 3 trials (under 5 minutes on 2 cores)")
    bench.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the figures as JSON")
    bench.add_argument("--oona", default=None, metavar="redis://HOST:PORT/DB", help="also run the Redis figures")
    bench.add_argument("--only", action="append", default=None, metavar="FIGURE",
                       help="run only this figure (repeatable): " + (figures or "see `tolaria bench --help`"))
    bench.add_argument("--compare", type=Path, default=None, metavar="OLD.json", help="flag regressions vs OLD")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cpu: the CPU figures (default); cuda: the GPU figures (step overhead at 10M/100M "
                       "parameters, fast rollback, checkpoint stall, snapshot GPU bytes), on a machine with CUDA")

    watch = sub.add_parser("watch", help="tail telemetry and emergencies from Redis Streams")
    watch.add_argument("url", metavar="redis://HOST:PORT/DB", help="the Redis the run publishes to (its --oona)")
    watch.add_argument("--count", type=int, default=None, help="stop after this many messages")
    watch.add_argument("--from-start", action="store_true", help="replay the streams from their start")
    watch.add_argument("--run", default=None, metavar="RUN_ID", help="show only this run's entries (its run id, "
                       "as in summary.json and each line's run=)")
    watch.add_argument("--level", default=None, metavar="LEVEL", help="show only entries at or above this severity: "
                       "info, warning, error, critical (or notice, elevated, conservative, halt); run markers stay")
    watch.add_argument("--stream", action="append", default=None, metavar="NAME", help="read this stream "
                       "(telemetry, emergency, normal, policy, deadletter, or a full name); repeat for several "
                       "(default: telemetry and emergency)")

    sub.add_parser("drills", help="list the fault drills `--inject` accepts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from esper.tolaria.checkpoint import CheckpointNotFound

    words = list(sys.argv[1:] if argv is None else argv)
    asks_bench_help = "bench" in words and ("-h" in words or "--help" in words)
    args = _parser(_bench_figures() if asks_bench_help else "").parse_args(words)
    handler = {"run": _cmd_run, "resume": _cmd_resume, "inspect": _cmd_inspect, "report": _cmd_report,
               "study": _cmd_study, "bench": _cmd_bench, "watch": _cmd_watch, "drills": _cmd_drills}[args.command]
    try:
        return int(handler(args))
    except (ValueError, FileNotFoundError, SecretMissing, CheckpointNotFound) as exc:
        print(f"tolaria {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from esper.tolaria.config import load_config
    from esper.tolaria.distributed import World
    from esper.tolaria.drills import FaultPlan
    from esper.tolaria.imports import on_sys_path, user_import_roots
    from esper.tolaria.job import run_job
    from esper.tolaria.loop.build import deterministic_cublas

    config = load_config(args.config, _run_overrides(args))
    names_user_code = config.model.factory or config.data.factory or ":" in config.task
    if names_user_code and not config.run.import_paths:  # in config.json: `tolaria resume` finds the code too
        config.run.import_paths = [str(args.config.resolve().parent)]
    run_dir = args.run_dir or Path("runs") / config.run.name
    _check_folder(run_dir, "--run-dir")
    if config.run.deterministic:
        deterministic_cublas()  # before NCCL or anything else starts CUDA: cuBLAS reads it once
    world = World.from_env(config.run.device, timeout_s=config.distributed.timeout_s)
    faults = FaultPlan.parse(args.inject, rank=world.rank)
    if world.is_leader:
        for warning in _unreachable_drills(faults, config.run.epochs):
            print(f"tolaria run: warning: {warning}", file=sys.stderr)
    if args.resume and (done := _already_trained(run_dir, None, config.run.epochs)):
        world.close()
        if world.is_leader:
            print(f"{done}; to train further: tolaria run {args.config} --run-dir {run_dir} --resume --epochs N")
        return 0
    try:
        # user code named in the config (model.factory, task, ...) lives next to it or in the cwd
        with on_sys_path(user_import_roots(args.config)):
            summary = run_job(config, run_dir, faults=faults, progress=not args.quiet, report=not args.no_report,
                              resume=args.resume, overwrite=args.overwrite, world=world)
    finally:
        world.close()
    if world.is_leader:
        _print_result(summary, run_dir)
    return _exit_status(summary)


def _bench_figures() -> str:
    """The registered bench figures by device, for `bench --only`'s help (importing the figure
    modules takes seconds, so only `bench --help` asks)."""
    from esper.tolaria.bench import registry
    from esper.tolaria.bench.harness import discover

    discover()
    by_device = {device: ", ".join(sorted(n for n, spec in registry.FIGURES.items() if spec.device == device))
                 for device in ("cpu", "cuda")}
    return f"{by_device['cpu']}; with --device cuda: {by_device['cuda']}"


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`--set` items, then the named flags over them (an explicit `--epochs 3` wins over `--set run.epochs=5`)."""
    from esper.tolaria.config import merge_overrides, parse_set_overrides

    flags: dict[str, dict[str, Any]] = {}
    named = {("run", "name"): args.name, ("run", "seed"): args.seed, ("run", "epochs"): args.epochs,
             ("run", "morphogenesis"): False if args.no_morphogenesis else None, ("oona", "url"): args.oona or None,
             ("oona", "remote_tamiyo"): True if args.remote_tamiyo else None,
             ("profile", "enabled"): True if args.profile else None}
    for (section, key), value in named.items():
        if value is not None:
            flags.setdefault(section, {})[key] = value
    return merge_overrides(parse_set_overrides(args.overrides), flags)


def _cmd_resume(args: argparse.Namespace) -> int:
    from esper.tolaria.distributed import World
    from esper.tolaria.imports import on_sys_path, user_import_roots
    from esper.tolaria.job import resume_job

    if args.into is not None:
        _check_folder(args.into, "--run-dir")
    world = World.from_env(*_saved_world(args.run_dir))
    refused = args.overwrite and args.into is None  # the job refuses to overwrite the run it resumes: say that
    epochs = args.epochs if args.epochs is not None else _saved_epochs(args.run_dir)
    if not refused and (done := _already_trained(args.run_dir, args.checkpoint, epochs)):
        world.close()
        if world.is_leader:
            print(f"{done}; to train further: tolaria resume {args.run_dir} --epochs N")
        return 0
    try:
        with on_sys_path(user_import_roots(None)):  # the run's config.json names user code relative to the cwd
            summary = resume_job(args.run_dir, epochs=args.epochs, progress=not args.quiet,
                                 report=not args.no_report, world=world, checkpoint=args.checkpoint, into=args.into,
                                 overwrite=args.overwrite)
    finally:
        world.close()
    if world.is_leader:
        _print_result(summary, args.into or args.run_dir)
    return _exit_status(summary)


def _check_folder(path: Path, flag: str) -> None:
    """A ValueError naming `flag` when `path` cannot become a folder: it, or a folder above it, is a file."""
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                whose = "is a file" if where == path else f"is inside {where}, which is a file"
                raise ValueError(f"{flag} {path} {whose}, not a directory: pass a folder path")
            return


def _unreachable_drills(faults: FaultPlan, epochs: int) -> list[str]:
    """A sentence for each drill scheduled at or after `epochs` (epochs count from 0): it never fires."""
    return [f"drill {d.kind}@epoch={d.epoch} never fires: the run's last epoch is {epochs - 1} (epochs count from 0; "
            f"this run trains {epochs}); schedule it at an epoch below {epochs} or raise --epochs"
            for d in faults.drills if d.epoch >= epochs]


def _already_trained(run_dir: Path, checkpoint: str | None, epochs: int | None) -> str:
    """What to say when the checkpoint a resume would start from has trained every one of `epochs`
    already (resuming it would train nothing); "" otherwise, or when the resume itself will report
    what is wrong (no run, no checkpoint, a bad name)."""
    from esper.tolaria.checkpoint import CheckpointNotFound, recover
    from esper.tolaria.job import checkpoint_name

    if epochs is None or not (run_dir / "checkpoints").is_dir():
        return ""
    try:
        name = checkpoint_name(run_dir, checkpoint) if checkpoint else None
        found = recover(run_dir / "checkpoints", clean=False, name=name).checkpoint
    except (CheckpointNotFound, ValueError):
        return ""
    if found is None or found.epoch < epochs or not _summary_covers(run_dir, found.epoch):
        return ""  # a run killed after its last checkpoint but before its summary: the resume writes it
    trained = f"all {epochs} of its epochs" if found.epoch == epochs else \
        f"{found.epoch} epochs, more than the {epochs} asked"
    return (f"{run_dir} has already trained {trained} ({found.name} resumes at epoch {found.epoch}, epochs counting "
            "from 0): nothing to train")


def _summary_covers(run_dir: Path, epochs: int) -> bool:
    """Whether RUN_DIR/summary.json was written for a run that had trained `epochs` epochs."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["epochs_completed"]) == epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _epoch_count(text: str) -> int:
    """`resume --epochs`: a whole number of epochs, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of epochs") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: train at least 1 epoch in total")
    return value


def _saved_epochs(run_dir: Path) -> int | None:
    """The resumed run's `run.epochs`, from its config.json when readable."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["run"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _saved_world(run_dir: Path) -> tuple[str, float]:
    """The resumed run's `run.device` (NCCL or gloo follows it) and `distributed.timeout_s`, from its
    config.json when readable."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return str(saved["run"]["device"]), float(saved.get("distributed", {}).get("timeout_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "auto", 0.0  # the resume itself reports what is wrong with the directory


def _exit_status(summary: dict[str, Any]) -> int:
    """130 after Ctrl-C, as shells expect of an interrupted command; 0 otherwise (a SIGTERM is the
    scheduler's graceful stop: checkpointed, resumable, not a failure)."""
    return 130 if summary.get("stopped") == "SIGINT" else 0


def _primary(summary: dict[str, Any]) -> str:
    """`accuracy 0.9481` for a classifier, `token_accuracy 0.5012 (perplexity 5.31)` for a language model."""
    name = summary.get("task", {}).get("primary_metric", "accuracy")
    metrics = summary.get("final_val_metrics") or {}
    text = f"{name} {metrics.get(name, summary['final_val_accuracy']):.4f}"
    return f"{text} (perplexity {metrics['perplexity']:.2f})" if "perplexity" in metrics else text


def _print_result(summary: dict[str, Any], run_dir: Path) -> None:
    seeds = summary.get("seeds", {})
    fossilized = sum(1 for s in seeds.values() if s.get("stage") == "FOSSILIZED")
    print(f"run {summary['run_id']}: {summary['epochs_completed']} epochs, "
          f"final val {_primary(summary)}, params {summary['param_count']:,}, "
          f"seeds {len(seeds)} ({fossilized} fossilized), rollbacks {len(summary['rollbacks'])}, "
          f"emergencies {len(summary['emergencies'])}")
    telemetry = summary.get("telemetry", {})
    if telemetry.get("spooled"):
        print(f"telemetry: {telemetry['spooled']} messages did not reach Oona; local copy: {telemetry['spool']}",
              file=sys.stderr)
    print(f"summary: {run_dir / 'summary.json'}")
    report = run_dir / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}")
    kept = summary.get("safety", {}).get("best_checkpoints") or []  # checkpoint.keep_best, best first
    if kept and (best := kept[0].get("best")):
        print(f"best checkpoint: {kept[0]['name']} ({best['metric']} {best['value']:.4f} at epoch {best['epoch']}); "
              f"continue from it: tolaria resume {run_dir} --from best")
    stopped = summary.get("stopped") or ""
    if stopped in ("SIGINT", "SIGTERM"):  # a signal is a pause; a halt or early stopping is the run's end
        print(f"interrupted ({stopped}) after {summary['epochs_completed']} epochs; continue with: "
              f"tolaria resume {run_dir}", file=sys.stderr)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from esper.tolaria.checkpoint import inspect as inspect_checkpoints

    info = inspect_checkpoints(args.path)
    if not info.get("checkpoints") and not info.get("wal", {}).get("records"):
        raise FileNotFoundError(f"{args.path} holds no checkpoints: pass a run directory written by `tolaria run`, "
                                f"its checkpoints/ folder or one ckpt-* folder")
    ok = 0 if all(c.get("status") == "ok" for c in info["checkpoints"]) else 1
    if args.json:
        print(json.dumps(_inspect_json(info), indent=2))
        return ok
    from rich.console import Console
    from rich.table import Table

    # Epochs are numbered from 0, as the console and --inject number them: a checkpoint written after
    # epoch 2 resumes at epoch 3, and its best score is epoch 2's.
    table = Table(title=f"checkpoints in {args.path}")
    for col in ("checkpoint", "resumes at epoch", "step", "size", "seeds", "kept as best", "status"):
        table.add_column(col)
    for c in info.get("checkpoints", []):
        seeds = ", ".join(f"{s.get('seed_id')}:{s.get('stage')}" for s in c.get("seeds", [])) or "-"
        table.add_row(str(c.get("name")), str(c.get("epoch")), str(c.get("step")),
                      f"{c.get('size_bytes', 0) / 1e6:.2f} MB", seeds, _best_cell(c.get("best")), str(c.get("status")))
    console = Console()
    if not console.is_terminal:  # piped into a file or a log: one unwrapped line per checkpoint
        console = Console(width=200)
    console.print(table)
    return ok


def _best_cell(best: dict[str, Any] | None) -> str:
    """`best 1: accuracy 0.9500 (epoch 3)`: its rank among the kept best, the metric, the epoch it is of."""
    if not best:
        return "-"
    return f"best {best['rank']}: {best['metric']} {best['value']:.4f} (epoch {best['epoch']})"


def _inspect_json(info: dict[str, Any]) -> dict[str, Any]:
    """`tolaria inspect --json`, format tolaria.inspect/1 (new keys may be added, none renamed):
    {"format", "directory", "checkpoints": [{"name", "path", "epoch", "step", "txn", "committed",
    "verified", "status", "size_bytes", "seeds": [{"seed_id", "stage"}], "best"}], "wal": {"segments",
    "records", "events"}}, checkpoints newest first. `status` is "ok", "uncommitted" or
    "corrupt: <file> <problem>"; `verified` is status == "ok"; epoch/txn are null when unreadable.
    `epoch` is the epoch the checkpoint resumes at, numbered from 0 (after epoch 2 it is 3). `best` is
    null, or {"rank", "metric", "mode", "value", "epoch"} for a checkpoint kept by checkpoint.keep_best,
    `epoch` there being the finished epoch the value is of."""
    def one(c: dict[str, Any]) -> dict[str, Any]:
        return {"name": c.get("name"), "path": str(c.get("path", "")), "epoch": c.get("epoch"),
                "step": c.get("step"), "txn": c.get("txn", c.get("txn_id")), "committed": bool(c.get("committed")),
                "verified": c.get("status") == "ok", "status": str(c.get("status")),
                "size_bytes": int(c.get("size_bytes") or 0),
                "seeds": [{"seed_id": s.get("seed_id"), "stage": s.get("stage")} for s in c.get("seeds", [])],
                "best": c.get("best")}

    wal = info.get("wal", {})
    return {"format": INSPECT_FORMAT, "directory": str(info.get("directory", "")),
            "checkpoints": [one(c) for c in info.get("checkpoints", [])],
            "wal": {"segments": list(wal.get("segments", [])), "records": int(wal.get("records", 0)),
                    "events": [str(e) for e in wal.get("events", [])]}}


def _cmd_report(args: argparse.Namespace) -> int:
    from esper.tolaria.observe.report import generate_report

    runs: list[Path] = args.run_dir
    if len(runs) == 1 and runs[0].suffix == ".json":  # a study, from `tolaria study --json`
        from esper.tolaria.observe.study_report import write_study_report
        print(f"study report: {write_study_report(runs[0], args.out)}")
        return 0
    if len(runs) == 1:
        print(f"report: {generate_report(runs[0])}")
        return 0
    from esper.tolaria.observe.compare import compare_runs

    out = args.out or runs[0] / "report" / "compare"
    _check_folder(out, "--out")
    print(f"comparison: {compare_runs(runs, out)}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from esper.tolaria.config import parse_set_overrides
    from esper.tolaria.study import format_table, parse_seeds, run_study

    root = args.run_root or Path("runs") / f"study-{args.config.stem}"
    study = run_study(args.config, parse_seeds(args.seeds), run_root=root, out=args.json, epochs=args.epochs,
                      overrides=parse_set_overrides(args.overrides))
    print(format_table(study))
    print(f"study: {args.json} (tolaria report {args.json} draws it)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from esper.tolaria.bench.harness import compare, print_compare, print_table, run_bench

    result = run_bench(quick=args.quick, only=args.only, oona_url=args.oona, trials=None, device=args.device)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"figures: {args.json}")
    if args.compare:
        regressions = compare(json.loads(args.compare.read_text()), result)
        print_compare(regressions)
        return 1 if regressions else 0
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from esper.oona.watch import run_watch

    return int(run_watch(args.url, count=args.count, from_start=args.from_start, run=args.run, level=args.level,
                         streams=args.stream))


def _cmd_drills(args: argparse.Namespace) -> int:
    from esper.tolaria.drills import DRILLS

    for kind, what in DRILLS.items():
        print(f"{kind:24s} {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
