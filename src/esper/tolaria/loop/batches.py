"""`EpochBatches`: the training data of one epoch, from the run's current position.

The loader's batch sampler, when it can say where it is (`state_dict`, `set_position`,
`consume`, as `data.ResumableBatchSampler`), makes a mid-epoch restart resume at the right
batch and skip the batches a rollback marked. Building an iterator draws the DataLoader's base
seed (worker seeds) from its generator, torch's global one unless the loader has its own. A
restart mid-epoch (resume, rollback) therefore builds it from the generator state the epoch's
first iterator was built from (`iterator_rng`, in every snapshot) and then puts the restored
state back: the draw, and the stream that dropout and augmentation read after it, are those of
the uninterrupted run. Randomness drawn inside worker processes restarts with the workers
(seeded from the base seed): exact across a restart at an epoch boundary, not mid-epoch.

A loader without a positioned sampler (a user's shuffled DataLoader) cannot jump: a mid-epoch
restart rebuilds the iterator from the epoch's first generator state and draws the batches
already trained (the sampler's shuffle, the loading), then puts the restored state back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from esper.tolaria.state.position import TrainerState
from esper.tolaria.state.registry import StateRegistry
from esper.tolaria.state.rng import loader_generator, rng_state, set_rng_state
from esper.tolaria.state.snapshot import deep_clone


@runtime_checkable
class PositionedSampler(Protocol):
    """A batch sampler that knows its position in the epoch and survives a resume."""

    skipped: set[tuple[int, int]]

    def set_position(self, epoch: int, batch: int) -> None: ...

    def consume(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


class EpochBatches:
    """The epoch's batches from the run's position, grouped into optimizer steps of `accumulate`
    micro-batches (the epoch's last step takes what is left)."""

    def __init__(self, loader: Iterable[Any], position: TrainerState, *, accumulate: int = 1) -> None:
        self.loader, self.position, self.accumulate = loader, position, accumulate
        self._next = 0  # the next batch's index, for a loader without a positioned sampler
        sampler = getattr(loader, "batch_sampler", None)  # a DataLoader's; any iterable may have none
        self.sampler = sampler if isinstance(sampler, PositionedSampler) else None  # checked once
        self.iterator_rng: torch.Tensor | None = None  # what this epoch's iterator was built from

    @property
    def generator(self) -> torch.Generator:
        """The generator a new iterator draws its base seed from (read each time: the loader may be replaced)."""
        return loader_generator(self.loader)

    def register(self, registry: StateRegistry) -> None:
        registry.register("rng", _RngSection(self))
        registry.register("iterator_rng", _IteratorRngSection(self))
        registry.register("data", _DataSection(self.sampler) if self.sampler is not None else None)

    def steps(self) -> Iterator[tuple[list[Any], list[int]]]:
        """(micro-batches, their indices in the epoch) per optimizer step."""
        k = self.accumulate
        if k == 1:  # the common case, without the grouping's bookkeeping
            for batch in self:
                yield [batch], [self.consume()]
            return
        micro: list[Any] = []
        indices: list[int] = []
        for batch in self:
            micro.append(batch)
            indices.append(self.consume())
            if len(micro) == k:
                yield micro, indices
                micro, indices = [], []
        if micro:
            yield micro, indices

    def __iter__(self) -> Iterator[Any]:
        epoch, batch = self.position.epoch, self.position.batch_in_epoch
        self._next = batch
        if self.sampler is not None:
            self.sampler.set_position(epoch, batch)
        generator = self.generator
        if batch == 0 or self.iterator_rng is None:
            self.iterator_rng = generator.get_state()
            return iter(self.loader)
        restored = generator.get_state()
        generator.set_state(self.iterator_rng)
        try:
            iterator = iter(self.loader)
            if self.sampler is None:  # no position to jump to: replay the epoch's draws up to the batch
                for _ in itertools.islice(iterator, batch):
                    pass
            return iterator
        finally:
            generator.set_state(restored)

    def consume(self) -> int:
        """The index in the epoch of the batch just received. The sampler's consumed one, not its
        latest: DataLoader workers fetch batches ahead of the loop."""
        if self.sampler is not None:
            return self.sampler.consume()
        self._next += 1
        return self._next - 1

    def skip(self, batch: tuple[int, int]) -> None:
        """Never train (epoch, batch) again (a rollback's offending batch)."""
        if self.sampler is not None:
            self.sampler.skipped.add(batch)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class _RngSection:
    """The "rng" section: the global generators and the loader's own."""

    def __init__(self, batches: EpochBatches) -> None:
        self.batches = batches

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.batches.generator)

    def load_state_dict(self, state: Any) -> None:
        set_rng_state(state, self.batches.generator)


class _DataSection:
    """The "data" section: the sampler's position. A rollback goes back to the saved position, and
    the batches skipped since (the rollbacks' offending ones) stay skipped, whatever the target knew."""

    def __init__(self, sampler: PositionedSampler) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.sampler.load_state_dict(state)

    def rewind_to(self, state: Any) -> None:
        skipped = set(self.sampler.skipped)
        self.sampler.load_state_dict(state)
        self.sampler.skipped |= skipped


class _IteratorRngSection:
    def __init__(self, batches: EpochBatches) -> None:
        self.batches = batches

    def state_dict(self) -> torch.Tensor | None:
        return self.batches.iterator_rng

    def load_state_dict(self, state: Any) -> None:
        self.batches.iterator_rng = deep_clone(state)  # not the snapshot's tensor: its buffer is reused
