"""Typed, validated configuration for a Tolaria run, loadable from TOML.

One pydantic model per component; unknown keys and bad values are errors naming the key and
the fix (`ConfigError`). TOML sections map one to one onto the fields of `TolariaConfig`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("tolaria", description="Run name: used for the run id and the emergency channel name.")
    epochs: int = Field(20, ge=1, description="Epochs to train.")
    seed: int = Field(0, ge=0, description="Seed for torch, numpy and python RNGs and for the data order.")
    deterministic: bool = Field(True, description="Use deterministic torch algorithms (bit-exact resume).")
    morphogenesis: bool = Field(True, description="Let Tamiyo grow the model; false trains the host alone.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    import_paths: list[str] = Field(default_factory=list, description="Directories searched first for the "
                                    "model.factory, data.factory and task import paths, then the current "
                                    "directory; `tolaria run` adds the config file's directory.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
                        description="Where the model, seeds and batches live: auto (cuda when available, else cpu), "
                        "cpu, cuda or cuda:N.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 (autocast, no loss scaling); fp16 (autocast and a GradScaler: a step whose "
        "scaled gradients overflow is skipped and the scale lowered, not an incident).")
    loss_readback: Literal["auto", "sync", "deferred"] = Field(
        "auto", description="When a step's loss is read: sync (every step waits for it); deferred (read one step "
        "later, so the step never waits for the device; a bad step found late is rolled back and replayed with "
        "checks); auto: deferred on CUDA in one process, else sync.")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        False, description="torch.compile the host model's forward in place: false; true (torch's default mode); "
        "or a torch.compile mode. A seed's structure change compiles once more; checkpoints keep the uncompiled "
        "parameter names, so a compiled run and an eager one resume each other's checkpoints.")
    compile_backend: str = Field(
        "inductor", description="torch.compile backend for run.compile (inductor compiles kernels; aot_eager and "
        "eager trace only, needing no compiler).")


class DataConfig(Section):
    factory: str = Field("", description="`package.module:function` returning the user's data: (train, val) "
                         "DataLoaders or Datasets (datasets get Tolaria's resumable sampler with batch_size and "
                         "num_workers), or a dict with `train` and `val`. Empty: the bundled `dataset`.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of data.factory.")
    dataset: Literal["digits", "synthetic"] = Field("digits", description="Bundled data set (no data.factory).")
    batch_size: int = Field(32, ge=1, description="Training batch size (micro-batch size with "
                            "optimizer.accumulate_steps > 1).")
    val_batch_size: int = Field(512, ge=1, description="Validation batch size of the loader Tolaria builds for a "
                                "validation Dataset.")
    val_fraction: float = Field(0.3, gt=0, lt=1, description="Fraction held out for validation.")
    split_seed: int = Field(0, ge=0, description="Seed of the train/validation split.")
    synthetic_samples: int = Field(2048, ge=64, description="Samples for the synthetic data set.")
    synthetic_features: int = Field(64, ge=2, description="Features for the synthetic data set.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes of the training loader (0: load "
                             "in the training process). Resume and batch skipping stay exact with workers.")


class ModelConfig(Section):
    factory: str = Field("", description="`package.module:function` returning the host nn.Module, called with "
                         "[model.kwargs]. Empty: the bundled MLP (`kind`, `hidden`, `dropout`).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of model.factory.")
    kind: Literal["mlp"] = Field("mlp", description="Bundled host architecture (no model.factory).")
    hidden: list[int] = Field(default_factory=lambda: [16], description="Hidden layer widths of the host MLP.")
    slots: list[str] = Field(default_factory=list, description="Module names where Kasmina attaches seed slots.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability after each hidden activation of "
                           "the host MLP (0: none). Must be in [0, 1).")
    initial_manifest: str = Field("", description="A structure manifest JSON (a grown run's `final_manifest` in "
                                  "summary.json, as `tolaria study` writes it): its seeds are built into the host at "
                                  "birth as fixed parts at full strength, trained from step 0 (the static baseline).")

    @model_validator(mode="after")
    def _widths_positive(self) -> ModelConfig:
        if not self.hidden or any(w < 1 for w in self.hidden):
            raise ValueError("model.hidden must list at least one positive width, e.g. hidden = [16]")
        return self


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("adam", description="torch.optim optimizer.")
    lr: float = Field(3e-3, gt=0, description="Base learning rate of the host group.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd, rmsprop).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    accumulate_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation); "
                                  "steps, LR schedules, monitors and snapshots count optimizer steps.")


class LRConfig(Section):
    host_policy: Literal["cosine", "constant", "step", "morpho_adaptive"] = Field(
        "cosine", description="Policy of the host group.")
    warmup_steps: int = Field(20, ge=0, description="Host warm-up steps (cosine).")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="Cosine floor as a fraction of the base LR.")
    seed_warmup_steps: int = Field(20, ge=0, description="Warm-up steps of a new seed's group.")
    seed_lr_ratio: float = Field(1.0, gt=0, description="Seed group base LR as a fraction of the host base LR.")
    tolerance: float = Field(1e-6, gt=0, description="Relative tolerance of the out-of-band LR check.")
    step_epochs: int = Field(10, ge=1, description="Epochs between the step policy's LR decays.")
    total_steps: int | None = Field(None, ge=1, description="Optimizer steps of the whole run for the cosine and "
                                    "step policies (default: epochs x len(train loader)); required when the "
                                    "training loader has no len(). The step policy decays every "
                                    "step_epochs x (total_steps // epochs) steps.")


class BoundaryConfig(Section):
    """Per-phase budgets of Tolaria's own boundary work (validation excluded), from the design."""

    state_assembly_ms: float = Field(3.5, gt=0)
    tamiyo_ms: float = Field(12.0, gt=0)
    apply_ms: float = Field(1.5, gt=0)
    check_ms: float = Field(1.0, gt=0)
    total_ms: float = Field(18.0, gt=0)


class HandshakeConfig(Section):
    tamiyo_timeout_s: float = Field(2.0, gt=0, description="Hard deadline of one Tamiyo call.")
    command_max_age_s: float = Field(60.0, gt=0, description="Commands issued longer ago are expired.")
    max_abandoned_workers: int = Field(4, ge=1, description="Hung Tamiyo calls tolerated before calls are refused.")


class BreakerConfig(Section):
    failure_threshold: int = Field(3, ge=1, description="Consecutive failures that open a breaker.")
    cooldown_calls: int = Field(2, ge=1, description="Refused calls while OPEN before a HALF_OPEN probe.")


class ConservativeConfig(Section):
    healthy_epochs_to_exit: int = Field(2, ge=1, description="Healthy boundaries with all breakers closed to leave.")
    tamiyo_timeout_factor: float = Field(0.5, gt=0, le=1, description="Tamiyo deadline multiplier while conservative.")


class TelemetryConfig(Section):
    queue_size: int = Field(10_000, ge=16, description="Bounded queue of normal telemetry.")
    step_interval: int = Field(50, ge=0, description="Publish step metrics every N steps (0: only per epoch).")
    jsonl: bool = Field(True, description="Append telemetry to RUN_DIR/telemetry.jsonl (in-process bus).")
    step_log: bool = Field(False, description="Append `global_step,loss` to RUN_DIR/steps.csv (one sync per step; "
                           "for comparing runs exactly).")


class OonaConfig(Section):
    url: str = Field("", description="redis://HOST:PORT/DB for Redis Streams; empty = in-process bus.")
    remote_tamiyo: bool = Field(False, description="Ask a `tamiyo serve` worker over Oona instead of in-process.")
    secret_file: str = Field("", description="File holding the shared HMAC secret; empty reads "
                             "the ESPER_LEYLINE_SECRET environment variable. Never commit the secret.")


class KeepBestConfig(Section):
    top_k: int = Field(0, ge=0, description="Keep the checkpoints of the top_k epochs by the metric beside the last "
                       "keep_last; retention never deletes them (0: off). `tolaria resume RUN --from best` "
                       "continues from the best.")
    metric: str = Field("", description="The validation metric ranked (empty: the task's primary metric; any name "
                        "the task reports, e.g. loss, perplexity, r2).")
    mode: Literal["auto", "max", "min"] = Field("auto", description="max or min is better; auto: the task's "
                                                "direction for its primary metric, min for loss.")

    @model_validator(mode="after")
    def _on_when_configured(self) -> KeepBestConfig:
        if self.top_k == 0 and (self.metric or self.mode != "auto"):
            raise ValueError("checkpoint.keep_best names a metric or mode but top_k is 0 (off): set "
                             "checkpoint.keep_best.top_k to how many best checkpoints to keep, e.g. 1")
        return self


class CheckpointConfig(Section):
    enabled: bool = Field(True, description="Write durable checkpoints to RUN_DIR/checkpoints.")
    every_epochs: int = Field(1, ge=1, description="Checkpoint cadence in epochs.")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept on disk.")
    keep_best: KeepBestConfig = Field(default_factory=KeepBestConfig, description="The best checkpoints by a "
                                      "validation metric, kept beside the last keep_last: {top_k, metric, mode}.")


class EarlyStoppingConfig(Section):
    patience: int = Field(0, ge=0, description="Stop when the metric has not improved for this many epochs "
                          "(0: never stop early).")
    metric: str = Field("", description="The validation metric watched (empty: the task's primary metric; "
                        "any name the task reports, e.g. loss, perplexity, r2).")
    mode: Literal["auto", "max", "min"] = Field("auto", description="max or min is better; auto: the task's "
                                                "direction for its primary metric, min for loss.")
    min_delta: float = Field(0.0, ge=0, description="An improvement smaller than this does not count.")


class SnapshotConfig(Section):
    capacity: int = Field(5, ge=1, description="In-memory snapshots kept for fast rollback.")
    every_steps: int = Field(0, ge=0, description="Also snapshot every N steps (0: epoch boundaries only).")
    max_mb: float = Field(2048.0, gt=0, description="Host-memory cap of the snapshot cache in MiB. Unset: 2 GiB, "
                          "raised to two snapshots' bytes where available host RAM holds them.")
    recycle: bool = Field(True, description="Copy new snapshots into an evicted snapshot's buffers (one extra "
                          "snapshot of memory beyond max_mb; far less time per snapshot).")
    copy_behind: bool = Field(True, description="Copy parameters and optimizer state into a snapshot on a "
                              "background thread while the next step's forward and backward run; the step "
                              "waits for it only before the optimizer writes them.")


class EmergencyConfig(Section):
    spike_factor: float = Field(15.0, gt=1, description="Loss above factor x running baseline is a SEVERE spike.")
    accuracy_drop: float = Field(0.25, gt=0, le=1, description="Validation accuracy drop vs best that is MAJOR.")
    watchdog_s: float = Field(60.0, gt=0, description="No step progress for this long is CRITICAL.")
    max_rollbacks_without_progress: int = Field(5, ge=1, description="Rollbacks allowed before a clean window "
                                                "proves a new snapshot; one more fails the level and "
                                                "escalates (a fault that recurs must not loop forever).")
    grad_check_every: int = Field(8, ge=1, description="Read every gradient (norm and non-finite check) every N "
                                  "steps, and on every step while replaying after a rollback. Between checks a "
                                  "non-finite gradient makes the weights non-finite, which the next step's loss "
                                  "shows; the rollback's replay then checks each step and skips the batch that "
                                  "caused it. 1 checks every step (1-2 % of a CPU step). Clipping measures the "
                                  "norm on every step anyway.")
    spike_lr_factor: float = Field(0.5, gt=0, le=1, description="LR multiplier applied after a spike recovery.")
    broadcast: bool = Field(True, description="Create the shared-memory emergency channel of this run, keyed by "
                            "its run directory and rank (CRITICAL signals reach other processes on the host; "
                            "runs of one config in different directories never collide).")


class DistributedConfig(Section):
    timeout_s: float = Field(600.0, gt=0, description="Under torchrun: the longest any collective waits for the "
                             "other ranks. A peer that is dead or hung longer makes every surviving rank flush its "
                             "checkpoint writes and exit with status 75; `torchrun --max-restarts N` then resumes "
                             "the job from rank 0's last committed checkpoint.")


class ExportersConfig(Section):
    prometheus_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics on 127.0.0.1:PORT "
                                 "while the run is live (0: off).")
    tensorboard_dir: str = Field("", description="Deprecated: use [loggers.tensorboard] enabled = true, dir = "
                                 "\"...\". Still honoured (it turns the TensorBoard logger on, writing here) with a "
                                 "warning; empty: off.")


class CsvLoggerConfig(Section):
    enabled: bool = Field(True, description="RUN_DIR/metrics.csv (a header row, then one row per epoch) and "
                          "RUN_DIR/events.csv (seed transitions with their reasons, rollbacks, emergencies).")


class TensorBoardLoggerConfig(Section):
    enabled: bool = Field(False, description="Write TensorBoard event files (`pip install "
                          "esper-tolaria[tensorboard]`).")
    dir: str = Field("", description="Where the event files go; empty: RUN_DIR/tensorboard.")


class MlflowLoggerConfig(Section):
    enabled: bool = Field(False, description="Log to MLflow (`pip install esper-tolaria[mlflow]`).")
    tracking_uri: str = Field("", description="An MLflow tracking URI (http://HOST:PORT, sqlite:///FILE, file:DIR); "
                              "empty: a local file store in RUN_DIR/mlruns.")
    experiment: str = Field("", description="MLflow experiment name; empty: run.name.")


class WandbLoggerConfig(Section):
    enabled: bool = Field(False, description="Log to Weights & Biases (`pip install esper-tolaria[wandb]`).")
    project: str = Field("", description="W&B project; empty: run.name.")
    entity: str = Field("", description="W&B entity (user or team); empty: your default entity.")
    mode: Literal["", "online", "offline", "disabled"] = Field(
        "", description="online, offline (written under the W&B dir, `wandb sync` uploads it later; needs no "
        "network or account) or disabled; empty: WANDB_MODE, else online.")


class LoggersConfig(Section):
    """Experiment loggers: each gets the epoch metrics, seed events, rollbacks, emergencies and the config."""

    step_every: int = Field(0, ge=0, description="Also log the training loss and the LRs every N optimizer steps "
                            "(0: per epoch only); each logged step waits for its loss on a GPU.")
    csv: CsvLoggerConfig = Field(default_factory=CsvLoggerConfig)
    tensorboard: TensorBoardLoggerConfig = Field(default_factory=TensorBoardLoggerConfig)
    mlflow: MlflowLoggerConfig = Field(default_factory=MlflowLoggerConfig)
    wandb: WandbLoggerConfig = Field(default_factory=WandbLoggerConfig)


class ProfileConfig(Section):
    enabled: bool = Field(False, description="Record spans and write RUN_DIR/trace.json (Chrome trace).")


class GrowthConfig(Section):
    """Growth safety: what Tolaria refuses to apply, and when a mutation counts as a collapse."""

    max_params: int = Field(0, ge=0, description="Refuse a GERMINATE that would grow the model past this many "
                            "parameters (0: no budget).")
    max_memory_mb: float = Field(0.0, ge=0, description="Refuse a GERMINATE whose model would need more than this "
                                 "many MiB for parameters, gradients and two optimizer moments (4 copies of every "
                                 "parameter at its element size; 0: no budget).")
    veto_unpaid_fossilize: bool = Field(True, description="Refuse FOSSILIZE of a seed whose last counterfactual "
                                        "attribution is negative (validation is better without it).")
    collapse_fraction: float = Field(0.9, gt=0, le=1, description="Validation loss at or above this fraction of the "
                                     "chance loss ln(classes), after it was below collapse_below of it, is a "
                                     "collapse: a MAJOR incident and a rollback.")
    collapse_below: float = Field(0.5, gt=0, lt=1, description="How far below the chance loss (as a fraction of it) "
                                  "validation must have been for a return near it to count as a collapse.")


class TolariaConfig(Section):
    task: str = Field("classification", description="What a step computes: classification, regression, "
                      "language_model, or `package.module:Class` implementing esper.tolaria.tasks.Task.")
    task_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the task.")
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr: LRConfig = Field(default_factory=LRConfig)
    aggregation: dict[str, Any] = Field(default_factory=dict, description="esper.tolaria.control.aggregation config.")
    kasmina: dict[str, Any] = Field(default_factory=dict, description="esper.kasmina config.")
    tamiyo: dict[str, Any] = Field(default_factory=dict, description="esper.tamiyo heuristic config.")
    boundary: BoundaryConfig = Field(default_factory=BoundaryConfig)
    handshake: HandshakeConfig = Field(default_factory=HandshakeConfig)
    breakers: BreakerConfig = Field(default_factory=BreakerConfig)
    conservative: ConservativeConfig = Field(default_factory=ConservativeConfig)
    growth: GrowthConfig = Field(default_factory=GrowthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    oona: OonaConfig = Field(default_factory=OonaConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    emergency: EmergencyConfig = Field(default_factory=EmergencyConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    exporters: ExportersConfig = Field(default_factory=ExportersConfig)
    loggers: LoggersConfig = Field(default_factory=LoggersConfig)

    def sha256(self) -> str:
        """Hash of the effective config, stored in snapshots so a resume notices a changed config."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _describe(error: ValidationError, source: str, model: type[BaseModel] | None = None,
              blame: Callable[[tuple[int | str, ...]], str] | None = None) -> list[str]:
    """One line per error: the key, what is wrong, the fix, and (with `blame`) where the value came from."""
    lines = []
    for item in error.errors():
        loc = item["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        origin = f" [from {blame(loc)}]" if blame is not None else ""
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model or TolariaConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"  {key}: unknown key; remove it or check the spelling ({hint}valid keys here: "
                         f"{', '.join(valid) or 'see src/esper/tolaria/config.py'}; examples/digits.toml shows a "
                         f"full config){origin}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r}){origin}")
    return lines


def _valid_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the section at `loc`, so an unknown-key error can list the real ones."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>",
                     blame: Callable[[tuple[int | str, ...]], str] | None = None) -> TolariaConfig:
    """Validate a nested dict; component sub-configs (kasmina, tamiyo, aggregation) are checked too.
    Every error in every section is reported at once; `blame` names where a key's value came from."""
    lines: list[str] = []
    config: TolariaConfig | None = None
    try:
        config = TolariaConfig.model_validate(data)
    except ValidationError as exc:
        lines += _describe(exc, source, blame=blame)
    lines += _component_errors(data, blame)
    if lines or config is None:
        raise ConfigError("\n".join([f"invalid config {source}:", *lines]))
    return config


def _component_errors(data: Mapping[str, Any], blame: Callable[[tuple[int | str, ...]], str] | None) -> list[str]:
    """Component configs are owned by their packages; validate them here so errors surface at load."""
    from esper.kasmina import KasminaConfig
    from esper.tamiyo import TamiyoConfig
    from esper.tolaria.control.aggregation import AggregationConfig

    lines: list[str] = []
    for section, model in (("kasmina", KasminaConfig), ("tamiyo", TamiyoConfig), ("aggregation", AggregationConfig)):
        values = data.get(section, {})
        if not isinstance(values, Mapping):
            continue  # the main schema reports a section that is not a table
        try:
            model.model_validate(values)
        except ValidationError as exc:
            described = _describe(exc, "", model, _within(section, blame))
            lines += [line.replace("  ", f"  {section}.", 1) for line in described]
    return lines


def _within(section: str, blame: Callable[[tuple[int | str, ...]], str] | None
            ) -> Callable[[tuple[int | str, ...]], str] | None:
    """`blame` for keys given relative to `section`."""
    if blame is None:
        return None
    outer = blame
    return lambda loc: outer((section, *loc))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TolariaConfig:
    """Load a TOML or YAML config (by extension); `overrides` is a nested dict merged over the file
    (CLI flags). An error names the key, the fix, and whether the value came from the file or the
    command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML or YAML file such as examples/digits.toml")
    data = _read_config_file(path)
    given = copy.deepcopy(overrides or {})
    if overrides:
        merge_overrides(data, overrides)

    def blame(loc: tuple[int | str, ...]) -> str:
        return "the command line (--set or a flag)" if _holds(given, loc) else str(path)

    return config_from_dict(data, source=str(path), blame=blame)


def _read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only for YAML configs: a TOML user needs no PyYAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (run:, data:, ...), "
                              f"not a {type(data).__name__}")
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = "; a YAML file needs the .yaml or .yml extension" if path.suffix.lower() != ".toml" else ""
        raise ConfigError(f"config file {path} is not valid TOML: {exc}{hint}") from None


def _holds(tree: Mapping[str, Any], loc: tuple[int | str, ...]) -> bool:
    """Whether the nested mapping `tree` has the key path `loc`."""
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or str(part) not in node:
            return False
        node = node[str(part)]
    return True


# ---------------------------------------------------------------- command-line overrides (`--set key=value`)


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optimizer": {"lr": 0.01}}` -> `{"optimizer.lr": 0.01}`: a config (or config.json) as dotted
    keys, the spelling `--set` takes; an empty table stays a value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_keys(value, f"{name}."))
        else:
            out[name] = value
    return out


def merge_overrides(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `overrides` into `base` in place, table by table: `{"model": {"kwargs": {"width": 64}}}`
    changes one keyword and keeps the file's others; anything that is not a table replaces."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_overrides(base[key], value)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return base


def parse_set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["run.epochs=3", "model.kwargs.width=64"]` -> `{"run": {"epochs": 3}, "model": {"kwargs": {"width": 64}}}`,
    each value typed by the schema (see `parse_set_item`); a later item wins over an earlier one."""
    overrides: dict[str, Any] = {}
    for item in items:
        merge_overrides(overrides, parse_set_item(item))
    return overrides


def parse_set_item(item: str) -> dict[str, Any]:
    """One `key.path=value` as a nested dict. The value is a TOML literal (`3`, `0.01`, `true`,
    `[32, 16]`, `{width = 64}`, `"text"`); a field that takes a string also takes it bare
    (`run.precision=bf16`). Inside free-form tables (model.kwargs, kasmina, ...) a value that is not
    TOML is a string; their own models check them at load."""
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep:
        raise ConfigError(f"--set {item}: expected KEY=VALUE (no '=' found), e.g. --set run.epochs=3")
    parts = key.split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"--set {item}: {key!r} is not a dotted key; expected e.g. --set optimizer.lr=0.01")
    value = _typed_value(parts, raw, item)
    for part in reversed(parts):
        value = {part: value}
    return value


def _typed_value(parts: list[str], raw: str, item: str) -> Any:
    """Walk the schema along `parts` and type `raw` by the field it ends at."""
    model: type[BaseModel] = TolariaConfig
    for depth, part in enumerate(parts):
        key, last = ".".join(parts[: depth + 1]), depth == len(parts) - 1
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"--set {item}: unknown key {key!r}{_did_you_mean(model, part)}; valid keys "
                              f"{_level(parts[:depth])}: {', '.join(_valid_keys(TolariaConfig, tuple(parts[:depth])))}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if last:
                raise ConfigError(f"--set {item}: {key} is a section, not a value; set one of its keys, e.g. "
                                  f"--set {key}.{next(iter(annotation.model_fields))}=... "
                                  f"(keys: {', '.join(annotation.model_fields)})")
            model = annotation
        elif get_origin(annotation) is dict and not last:
            return _toml_or_string(raw)  # a free-form table: its keys are the user's or a component's
        elif not last:
            raise ConfigError(f"--set {item}: {key} is a value, not a section; use --set {key}=VALUE")
        else:
            return _schema_value(annotation, raw, key, item)
    raise AssertionError("unreachable: the loop returns or raises at the last part")


def _level(parts: list[str]) -> str:
    return f"in [{'.'.join(parts)}]" if parts else "at the top level"


def _did_you_mean(model: type[BaseModel], part: str) -> str:
    close = difflib.get_close_matches(part, list(model.model_fields), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    owners = [name for name, f in model.model_fields.items() if isinstance(f.annotation, type)
              and issubclass(f.annotation, BaseModel) and part in f.annotation.model_fields]
    return f" (did you mean {owners[0]}.{part}?)" if owners else ""


_NOT_TOML = object()


def _toml(raw: str) -> Any:
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return _NOT_TOML
    return parsed["v"] if parsed.keys() == {"v"} else _NOT_TOML  # `1\nx = 2` is not one value


def _toml_or_string(raw: str) -> Any:
    parsed = _toml(raw)
    return raw if parsed is _NOT_TOML else parsed


def _schema_value(annotation: Any, raw: str, key: str, item: str) -> Any:
    """The TOML reading of `raw` if the field takes it, else `raw` as the field reads a string
    (bare words for string and choice fields), else an error naming the expected type."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    parsed = _toml(raw)
    candidates = ([parsed] if parsed is not _NOT_TOML else []) + [raw]
    for candidate in candidates:
        try:
            value = adapter.validate_python(candidate)
        except ValidationError:
            continue
        return candidate if candidate is parsed else value
    raise ConfigError(f"--set {item}: {key} expects {_expected(annotation)} (got {raw!r})")


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings")}


def _expected(annotation: Any) -> str:
    """The type of a field in words, for an override error."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None))
    if origin is list:
        sample = '["stem", "body.1"]' if args == (str,) else "[32, 16]"
        return f"a list of {_TYPE_WORDS.get(args[0], ('', 'values'))[1]} (TOML, e.g. {sample})"
    if origin is dict:
        return "a table (TOML, e.g. {width = 64})"
    return _TYPE_WORDS.get(annotation, (str(annotation), ""))[0]
