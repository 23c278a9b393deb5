"""KasminaLayer: seed slots inside a host model, driven by Leyline AdaptationCommands.

The host is never rewritten. Seeds live in `model.kasmina_seeds` (an `nn.ModuleDict`), so host
parameter names never change and seed parameters are `kasmina_seeds.<seed_id>.body.<...>`.
A slot is a module of the host (a name from `model.named_modules()`); a forward hook on it
replaces its output `h` by the blended output (see KASMINA.md for the exact form). Hooks are
attached only to slots that hold a seed, so a model without seeds pays nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from esper.contracts import ApplyResult, SeedLossTerm
from esper.kasmina.alpha import alpha_at
from esper.kasmina.blueprints import BlueprintError, BlueprintSpec, build_blueprint, resolve_blueprint
from esper.kasmina.config import KasminaConfig
from esper.kasmina.counterfactual import CounterfactualPlan
from esper.kasmina.counterfactual import blend as counterfactual_blend
from esper.kasmina.export import seed_states
from esper.kasmina.lifecycle import (
    APPLIED_STAGES,
    TRANSITIONS,
    SeedRecord,
    check_transition,
    op_name,
    stage_name,
)
from esper.kasmina.manifest import ManifestError, manifest_to_json, parse_manifest
from esper.kasmina.running_stats import running_stat_modules, scratch_running_stats
from esper.kasmina.slots import probe_once, resolve_slots
from esper.kasmina.widen import WIDEN, Widener
from esper.leyline import (
    COMMAND_SEED,
    SEED_OP_GERMINATE,
    SEED_OP_UNKNOWN,
    SEED_STAGE_BLENDING,
    SEED_STAGE_CULLED,
    SEED_STAGE_FOSSILIZED,
    SEED_STAGE_GERMINATED,
    SEED_STAGE_SHADOWING,
    AdaptationCommand,
    CommandType,
    SeedState,
)

SEED_CONTAINER = "kasmina_seeds"


class SeedModule(nn.Module):
    """One seed: a blueprint `body` and its blending weight `alpha` (a 0-dim buffer, changed in place)."""

    alpha: torch.Tensor

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("alpha", torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h)


class SeedContainer(nn.ModuleDict):
    """`model.kasmina_seeds`: the seeds by id. Its forward is the identity.

    Why: an `nn.Sequential` host calls every child in order, this container included, so it
    must pass its input through unchanged (for such hosts `len(model)` grows by one and the
    container is the last element).
    """

    def forward(self, x: Any) -> Any:
        return x


def _fail(reason: str, seed_id: str = "") -> ApplyResult:
    return ApplyResult(ok=False, reason=reason, seed_id=seed_id)


class KasminaLayer:
    """The execution layer (implements `esper.contracts.ExecutionLayer`).

    Activation shapes: a seed is built from the per-sample shape of its slot's output. Shapes are
    recorded by one-time probe hooks on the first forward pass, or at construction if
    `example_input` is given (a no-grad forward in eval mode; module modes are restored).
    Germinating before any shape is known is an error result that says so.
    """

    def __init__(
        self,
        model: nn.Module,
        slots: Sequence[str],
        *,
        config: KasminaConfig | None = None,
        seed: int = 0,
        example_input: torch.Tensor | None = None,
    ) -> None:
        self._model = model
        self._config = config or KasminaConfig()
        self._seed = seed
        self._slots = tuple(slots)
        self._slot_modules = resolve_slots(model, self._slots)
        if hasattr(model, SEED_CONTAINER):
            raise ValueError(f"model already has a `{SEED_CONTAINER}` attribute: attach one KasminaLayer per model")
        self._running_stats = running_stat_modules(model)  # the host's BatchNorm-like modules, found once
        self._container = SeedContainer()
        model.add_module(SEED_CONTAINER, self._container)
        self._records: dict[str, SeedRecord] = {}
        self._seed_counter = 0
        self._epoch = 0
        self._last_val_loss: float | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._shape_errors: dict[str, str] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self._chains: dict[str, list[tuple[str, SeedModule, bool]]] = {s: [] for s in self._slots}
        self._own_loss: SeedRecord | None = None
        self._plan: CounterfactualPlan | None = None  # set only inside `counterfactual()`
        self._attribution: dict[str, dict[str, float]] = {}  # the last validation's, by seed id
        self._costs: dict[tuple[str, str], int] = {}  # (slot, blueprint) -> parameters a germination adds
        self._widener = Widener(model, self._config.widen, units=self._config.widen_units, layer_seed=seed)
        self._probes = {s: m.register_forward_hook(self._make_probe(s)) for s, m in self._slot_modules.items()}
        if example_input is not None:
            probe_once(model, example_input)

    # ------------------------------------------------------------------ construction helpers

    def _make_probe(self, slot: str) -> Callable[[nn.Module, Any, Any], None]:
        def probe(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() >= 1:
                self._shapes.setdefault(slot, tuple(output.shape[1:]))
            else:
                self._shape_errors[slot] = f"slot {slot!r} outputs {type(output).__name__}, seeds need a batched tensor"
            handle = self._probes.pop(slot, None)
            if handle is not None:
                handle.remove()

        return probe

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def config(self) -> KasminaConfig:
        return self._config

    @property
    def slots(self) -> tuple[str, ...]:
        return self._slots

    def seed_record(self, seed_id: str) -> SeedRecord:
        """The record of `seed_id` (read it, do not mutate it). KeyError if unknown."""
        return self._records[seed_id]

    def live_seed(self, slot: str) -> SeedRecord | None:
        """The live (not fossilized, not culled) seed occupying `slot`, if any."""
        for record in self._records.values():
            if record.slot == slot and record.live:
                return record
        return None

    def germination_params(self, slot: str, blueprint: str = "") -> int | None:
        """Parameters a GERMINATE of `blueprint` (empty: the default) in `slot` would add; None where it
        cannot (no such slot, no shape yet, no blueprint fits). Built once, from a private generator."""
        if blueprint == WIDEN:
            return self._widener.added_params(slot)
        shape = self._shapes.get(slot)
        if slot not in self._slot_modules or shape is None:
            return None
        try:
            name = resolve_blueprint(blueprint or self._config.default_blueprint, shape)
        except BlueprintError:
            return None
        key = (slot, name)
        if key not in self._costs:
            module = build_blueprint(name, shape, self._spec(), torch.Generator().manual_seed(0))
            self._costs[key] = sum(p.numel() for p in module.parameters())
        return self._costs[key]

    # ------------------------------------------------------------------ commands

    def apply_command(self, command: AdaptationCommand) -> ApplyResult:
        """Apply one command. A rejected command returns ok=False and changes nothing."""
        if command.command_type != COMMAND_SEED:
            name = CommandType.Name(command.command_type)  # type: ignore[arg-type]
            return ApplyResult(ok=True, reason=f"{name}: nothing for Kasmina to do")
        if command.WhichOneof("payload") != "seed_operation":
            return _fail("COMMAND_SEED without a seed_operation payload: build it with esper.leyline.seed_command")
        op = command.seed_operation.operation
        if op == SEED_OP_UNKNOWN:
            return _fail("COMMAND_SEED with SEED_OP_UNKNOWN: set seed_operation.operation")
        if op == SEED_OP_GERMINATE:
            return self._germinate(command.target_seed_id, command.seed_operation.blueprint_id)
        return self._transition(command.target_seed_id, op)

    def _germinate(self, slot: str, blueprint: str) -> ApplyResult:
        if blueprint == WIDEN:
            return self._widen(slot)
        if slot not in self._slot_modules:
            valid = list(self._slots)
            return _fail(f"GERMINATE: unknown slot {slot!r}; target_seed_id must name a slot, one of {valid}")
        occupant = self.live_seed(slot)
        if occupant is not None:
            return _fail(
                f"GERMINATE: slot {slot!r} is occupied by {occupant.seed_id} ({stage_name(occupant.stage)}); "
                "fossilize or cull it first"
            )
        shape = self._shapes.get(slot)
        if shape is None:
            why = self._shape_errors.get(slot, f"no activation shape observed at slot {slot!r}")
            return _fail(f"GERMINATE: {why}; run one forward pass first or pass example_input to KasminaLayer")
        requested = blueprint or self._config.default_blueprint
        spec = self._spec()
        seed_id = f"seed{self._seed_counter + 1}"
        try:
            blueprint = resolve_blueprint(requested, shape)  # the record keeps the resolved name
            module = self._build(seed_id, slot, blueprint, shape, spec)
        except BlueprintError as exc:
            return _fail(f"GERMINATE in slot {slot!r}: {exc}")
        self._seed_counter += 1
        record = SeedRecord(
            seed_id=seed_id, slot=slot, blueprint=blueprint, shape=shape, stage=SEED_STAGE_GERMINATED,
            created_epoch=self._epoch, hidden=spec.hidden, adapter_dim=spec.adapter_dim, rank=spec.rank,
            head_dim=spec.head_dim, causal=spec.causal, val_loss_at_germination=self._last_val_loss,
        )
        record.enter(SEED_STAGE_GERMINATED, self._epoch, self._last_val_loss)
        self._records[seed_id] = record
        self._container[seed_id] = module
        self._refresh_slot(slot)
        picked = f"{blueprint}, picked by {requested} for shape {shape}" if requested != blueprint else blueprint
        return ApplyResult(
            ok=True, reason=f"germinated {seed_id} ({picked}) in slot {slot}", seed_id=seed_id,
            added_params=self.param_names(seed_id),
        )

    def _widen(self, layer: str) -> ApplyResult:
        """GERMINATE `net2wider`: widen a host layer by `widen_units`, keeping the function (widen.py)."""
        if layer not in self._widener.pairs:
            return _fail(f"GERMINATE {WIDEN}: {layer!r} is not a widenable layer; kasmina.widen lists "
                         f"{sorted(self._widener.pairs)}")
        affected = self._widener.affected_slots(layer, self._slots, self._shapes)
        blocked = [r.seed_id for r in self._records.values() if r.stage != SEED_STAGE_CULLED and r.slot in affected]
        if blocked:
            return _fail(f"GERMINATE {WIDEN} of {layer!r}: seeds {blocked} sit on slots {sorted(affected)} whose width "
                         "it would change; widen before growing seeds there")
        reshaped = self._widener.widen(layer)
        for slot in affected:  # their seeds-to-be are built for the new width
            shape = self._shapes[slot]
            self._shapes[slot] = (shape[0] + self._widener.units, *shape[1:])
        self._costs = {k: v for k, v in self._costs.items() if k[0] not in affected}
        return ApplyResult(ok=True, reason=f"widened {layer} by {self._widener.units} units (Net2Net, "
                           "function-preserving)", reshaped_params=reshaped)

    def _spec(self) -> BlueprintSpec:
        cfg = self._config
        return BlueprintSpec(
            hidden=cfg.seed_hidden, adapter_dim=cfg.adapter_dim, rank=cfg.lowrank_rank,
            head_dim=cfg.attention_head_dim, causal=cfg.attention_causal,
        )

    def _build(
        self, seed_id: str, slot: str, blueprint: str, shape: tuple[int, ...], spec: BlueprintSpec
    ) -> SeedModule:
        digest = hashlib.sha256(f"{self._seed}:{seed_id}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        module = SeedModule(build_blueprint(blueprint, shape, spec, generator))
        # Device and dtype follow the host's parameters (the slot's own first, else the model's).
        anchor = next(self._slot_modules[slot].parameters(), None)
        if anchor is None:
            anchor = next(self._model.parameters(), None)
        if anchor is not None:
            module = module.to(device=anchor.device, dtype=anchor.dtype)
        return module

    def _transition(self, seed_id: str, op: int) -> ApplyResult:
        record = self._records.get(seed_id)
        if record is None or record.stage == SEED_STAGE_CULLED:
            known = [r.seed_id for r in self._records.values() if r.stage != SEED_STAGE_CULLED]
            state = "was culled" if record is not None else "is unknown"
            return _fail(f"{op_name(op)}: seed id {seed_id!r} {state}; existing seeds: {known}", seed_id)
        error = check_transition(record, op, self._config, self._last_val_loss)
        if error is not None:
            return _fail(f"{op_name(op)}: {error}", seed_id)
        return self._commit_transition(record, op)

    def _commit_transition(self, record: SeedRecord, op: int) -> ApplyResult:
        target = TRANSITIONS[op].target
        seed_id = record.seed_id
        module = self._seed_module(seed_id)
        if target is None:  # EVALUATE
            record.eval_steps_left = self._config.evaluation_steps
            reason = f"{seed_id}: evaluation window of {record.eval_steps_left} steps"
            return ApplyResult(ok=True, reason=reason, seed_id=seed_id)
        record.enter(target, self._epoch, self._last_val_loss)
        removed: tuple[str, ...] = ()
        frozen: tuple[str, ...] = ()
        if target == SEED_STAGE_BLENDING:
            record.blend_step, record.alpha = 0, 0.0
            record.val_loss_at_blend_start = self._last_val_loss
            module.alpha.fill_(0.0)
        elif target == SEED_STAGE_SHADOWING:
            record.alpha = 1.0
            module.alpha.fill_(1.0)
        elif target == SEED_STAGE_FOSSILIZED:
            record.eval_steps_left = 0
            frozen = self.param_names(seed_id)  # they leave the optimizer (group and state)
            for param in module.parameters():
                param.requires_grad_(False)
                param.grad = None
        elif target == SEED_STAGE_CULLED:
            removed = self.param_names(seed_id)
            record.eval_steps_left, record.alpha = 0, 0.0
            del self._container[seed_id]
        self._refresh_slot(record.slot)
        return ApplyResult(
            ok=True, reason=f"{seed_id}: {op_name(op)} -> {stage_name(target)}", seed_id=seed_id,
            removed_params=removed, frozen_params=frozen,
        )

    def _seed_module(self, seed_id: str) -> SeedModule:
        module = self._container[seed_id]
        if not isinstance(module, SeedModule):
            raise TypeError(f"{SEED_CONTAINER}.{seed_id} is a {type(module).__name__}, not a SeedModule")
        return module

    def param_names(self, seed_id: str) -> tuple[str, ...]:
        """Fully qualified names (as in `model.named_parameters()`) of seed `seed_id`'s parameters."""
        if seed_id not in self._container:
            return ()
        prefix = f"{SEED_CONTAINER}.{seed_id}."
        return tuple(prefix + name for name, _ in self._container[seed_id].named_parameters())

    # ------------------------------------------------------------------ hooks

    def _refresh_slot(self, slot: str) -> None:
        """Recompute the slot's blend chain and attach/detach its hook (hooks only where seeds are)."""
        records = [r for r in self._records.values() if r.slot == slot]
        self._chains[slot] = [
            (r.seed_id, self._seed_module(r.seed_id), r.stage == SEED_STAGE_BLENDING)
            for r in records
            if r.stage in APPLIED_STAGES
        ]
        needed = any(r.stage in APPLIED_STAGES or r.live for r in records)
        if needed and slot not in self._hooks:
            self._hooks[slot] = self._slot_modules[slot].register_forward_hook(self._make_hook(slot))
        elif not needed and slot in self._hooks:
            self._hooks.pop(slot).remove()

    def _make_hook(self, slot: str) -> Callable[[nn.Module, Any, Any], torch.Tensor | None]:
        def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
            chain = self._chains[slot]
            own = self._own_loss
            if own is not None and own.slot != slot:
                own = None
            if not chain and own is None:
                return None
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"Kasmina slot {slot!r} outputs {type(output).__name__}; seeds need a tensor output")
            if self._plan is not None:
                return counterfactual_blend(self._plan, slot, chain, output)
            h = output
            for seed_id, seed, blend in chain:
                if own is not None and seed_id == own.seed_id:
                    continue
                h = h + seed.alpha * seed(h) if blend else h + seed(h)
            if own is not None:
                detached = h.detach()  # the seed's own loss must not reach host layers upstream
                h = detached + self._container[own.seed_id](detached)
            return h

        return hook

    # ------------------------------------------------------------------ counterfactuals and attribution

    def attributable_seeds(self) -> tuple[str, ...]:
        """Live seeds the main forward applies (BLENDING, SHADOWING, PROBATIONARY): those whose
        removal changes the model's output now."""
        return tuple(r.seed_id for r in self._records.values() if r.live and r.stage in APPLIED_STAGES)

    @contextmanager
    def counterfactual(self, off: Sequence[str | None]) -> Iterator[None]:
        """Inside, each forward runs `len(off)` cases: case `c` with seed `off[c]` switched off (None:
        all on), fused into one forward with case-major rows (counterfactual.py: how, and when not)."""
        known = set(self.attributable_seeds())
        unknown = [s for s in off if s is not None and s not in known]
        if unknown:
            raise ValueError(f"counterfactual: {unknown} are not applied live seeds; choose from {sorted(known)}")
        plan = CounterfactualPlan(off)
        handle = self._model.register_forward_pre_hook(lambda *_: plan.begin_forward())
        self._plan = plan
        try:
            yield
        finally:
            self._plan = None
            handle.remove()

    def record_attribution(self, attribution: Mapping[str, Mapping[str, float]]) -> None:
        """The last validation's attribution per seed id (name -> value); exported in each seed's
        metrics as `attribution_<name>` until the next call."""
        self._attribution = {sid: {k: float(v) for k, v in values.items()} for sid, values in attribution.items()}

    # ------------------------------------------------------------------ training-time calls

    def on_step(self) -> None:
        """Advance every live seed by one optimizer step (step counters, alpha while BLENDING)."""
        for record in self._records.values():
            if not record.live:
                continue
            record.steps_in_stage += 1
            record.total_steps += 1
            if record.eval_steps_left:
                record.eval_steps_left -= 1
            if record.stage == SEED_STAGE_BLENDING and record.blend_step < self._config.blend_steps:
                record.blend_step += 1
                record.alpha = alpha_at(record.blend_step, self._config.blend_steps, self._config.alpha_steepness)
                self._seed_module(record.seed_id).alpha.fill_(record.alpha)

    def on_epoch_end(self, epoch: int, val_loss: float, val_accuracy: float) -> None:
        """Record the epoch's validation result; gates and exported metrics use it."""
        self._epoch = epoch
        self._last_val_loss = float(val_loss)
        for record in self._records.values():
            if record.stage == SEED_STAGE_CULLED:
                continue
            record.age_epochs += 1
            if record.live:
                record.epochs_in_stage += 1

    def own_loss_terms(self, compute_loss: Callable[[], torch.Tensor], batch_size: int) -> list[SeedLossTerm]:
        """One own-loss term per live seed: `compute_loss()` run with that seed at full strength on detached `h`.

        `compute_loss` is the caller's closure: the model's forward on the batch and the task's loss,
        whatever their form (tuples, masks, several inputs). Costs one call per live seed; other slots
        behave as in the main forward. The host's running statistics (BatchNorm) are left exactly as
        the main forward left them (see running_stats.py).
        """
        live = [r for r in self._records.values() if r.live]
        if not live:
            return []
        terms: list[SeedLossTerm] = []
        with scratch_running_stats(self._running_stats):
            for record in live:
                self._own_loss = record
                try:
                    loss = compute_loss()
                finally:
                    self._own_loss = None
                terms.append(
                    SeedLossTerm(
                        seed_id=record.seed_id, stage=record.stage, alpha=record.alpha,
                        in_evaluation=record.in_evaluation, loss=loss, batch_size=batch_size,
                        param_names=self.param_names(record.seed_id),
                    )
                )
        return terms

    def seed_loss_terms(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> list[SeedLossTerm]:
        """`own_loss_terms` for a model called as `model(inputs)` and a loss `loss_fn(outputs, targets)`."""
        return self.own_loss_terms(lambda: loss_fn(self._model(inputs), targets), int(inputs.shape[0]))

    # ------------------------------------------------------------------ export and summaries

    def export_seed_states(self) -> list[SeedState]:
        """DORMANT states for free slots (seed_id = slot name), then one per non-culled seed."""
        free = [(i, s) for i, s in enumerate(self._slots) if self.live_seed(s) is None]
        seeds = [r for r in self._records.values() if r.stage != SEED_STAGE_CULLED]
        modules = {r.seed_id: self._seed_module(r.seed_id) for r in seeds}
        costs = {s: self.germination_params(s) for _, s in free}
        return seed_states(free, seeds, modules, self._slots, self._last_val_loss, self._attribution,
                           {s: c for s, c in costs.items() if c is not None})

    def seeds_summary(self) -> list[dict[str, Any]]:
        """Every seed ever germinated with its stage history by epoch (for Tolaria's summary.json)."""
        return [
            {
                "seed_id": r.seed_id, "slot": r.slot, "blueprint": r.blueprint, "stage": stage_name(r.stage),
                "params": sum(p.numel() for p in self._container[r.seed_id].parameters())
                if r.seed_id in self._container else 0,
                "history": [{"epoch": e, "stage": stage_name(s)} for e, s in r.history],
            }
            for r in self._records.values()
        ]

    def param_count(self) -> int:
        """Parameters of the grown model (host + seeds still present)."""
        return sum(p.numel() for p in self._model.parameters())

    # ------------------------------------------------------------------ state

    def manifest(self) -> dict[str, Any]:
        """The grown structure and every counter, as JSON-serializable values."""
        return manifest_to_json(
            layer_seed=self._seed, slots=self._slots, seed_counter=self._seed_counter, epoch=self._epoch,
            last_val_loss=self._last_val_loss, shapes=self._shapes, records=list(self._records.values()),
            widenings=self._widener.applied,
        )

    def load_manifest(self, manifest: Mapping[str, Any]) -> ApplyResult:
        """Make this layer's structure and counters those of `manifest`.

        Seeds already present with the same id and architecture are kept; others are removed or
        built. Weights are not in the manifest: load `model.load_state_dict(saved)` afterwards.
        Any inconsistency returns ok=False and changes nothing.
        """
        try:
            parsed = parse_manifest(manifest)
        except ManifestError as exc:
            return _fail(f"load_manifest: {exc}")
        if list(parsed.slots) != list(self._slots) or parsed.layer_seed != self._seed:
            return _fail(
                f"load_manifest: manifest was written for slots {list(parsed.slots)} and seed {parsed.layer_seed}, "
                f"this layer has slots {list(self._slots)} and seed {self._seed}; construct KasminaLayer to match"
            )
        unknown = sorted({layer for layer, _ in parsed.widenings} - set(self._widener.pairs))
        if unknown:
            return _fail(f"load_manifest: the manifest widened {unknown}, which kasmina.widen does not list here")
        keep, build = self._plan_rebuild(parsed.records)
        try:
            built = {
                r.seed_id: self._build(r.seed_id, r.slot, r.blueprint, r.shape, r.spec()) for r in build
            }
        except BlueprintError as exc:
            return _fail(f"load_manifest: {exc}")
        old_names = {n for sid in self._container for n in self.param_names(sid)}
        old_trainable = self._trainable_seed_params()
        widened = self._widener.reconcile(parsed.widenings)
        for seed_id in [sid for sid in self._container if sid not in keep]:
            del self._container[seed_id]
        for seed_id, module in built.items():
            self._container[seed_id] = module
        self._records = {r.seed_id: r for r in parsed.records}
        self._attribution = {}  # measured on another structure; the next validation measures again
        self._seed_counter, self._epoch, self._last_val_loss = parsed.seed_counter, parsed.epoch, parsed.last_val_loss
        self._shapes.update(parsed.shapes)
        self._sync_modules_to_records()
        new_names = {n for sid in self._container for n in self.param_names(sid)}
        new_trainable = self._trainable_seed_params()
        rebuilt = {n for sid in built for n in self.param_names(sid)} & old_names & old_trainable & new_trainable
        return ApplyResult(
            ok=True, reason=f"loaded manifest with {len(self._container)} seed modules",
            added_params=tuple(sorted((new_names - old_names) | (new_trainable - old_trainable))),
            removed_params=tuple(sorted(old_names - new_names)),
            reshaped_params=tuple(sorted(rebuilt | set(widened))),
            frozen_params=tuple(sorted((old_trainable - new_trainable) & new_names)),
        )

    def _trainable_seed_params(self) -> set[str]:
        return {f"{SEED_CONTAINER}.{sid}.{n}" for sid, module in self._container.items()
                for n, p in module.named_parameters() if p.requires_grad}

    def _plan_rebuild(self, records: list[SeedRecord]) -> tuple[set[str], list[SeedRecord]]:
        keep: set[str] = set()
        build: list[SeedRecord] = []
        for record in records:
            if record.stage == SEED_STAGE_CULLED:
                continue
            current = self._records.get(record.seed_id)
            same = current is not None and record.seed_id in self._container and (
                (current.slot, current.blueprint, current.shape, current.spec())
                == (record.slot, record.blueprint, record.shape, record.spec())
            )
            if same:
                keep.add(record.seed_id)
            else:
                build.append(record)
        return keep, build

    def _sync_modules_to_records(self) -> None:
        for record in self._records.values():
            if record.seed_id not in self._container:
                continue
            module = self._seed_module(record.seed_id)
            module.alpha.fill_(record.alpha)
            frozen = record.stage == SEED_STAGE_FOSSILIZED
            for param in module.parameters():
                param.requires_grad_(not frozen)
        for slot in self._slots:
            self._refresh_slot(slot)

    def state_dict(self) -> dict[str, Any]:
        """Kasmina's own state. Every counter is in the manifest, so this wraps it."""
        return {"manifest": self.manifest()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; raises ValueError with the reason if it does not fit this layer."""
        result = self.load_manifest(state["manifest"])
        if not result.ok:
            raise ValueError(result.reason)
