"""Data for the main job, and a batch sampler whose position is part of the snapshot.

`ResumableBatchSampler` makes the batch order a pure function of (seed, epoch), so a resume
jumps straight to batch k of epoch e without iterating the loader, and spike recovery can
skip named batches (recorded in the snapshot, so a resumed run skips them too).

With DataLoader workers the sampler runs ahead of the loop (each worker holds
`prefetch_factor` batches), so the sampler's latest batch is not the loop's. The sampler
therefore queues the indices it yields, and the loop `consume()`s one per batch it receives:
a DataLoader delivers batches in sampler order (its default `in_order=True`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from esper.tolaria.config import DataConfig


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled batches, reproducible per epoch; `position` and `skipped` survive a resume.

    With `num_replicas > 1` each replica takes a disjoint, equal share of every global batch
    (rank r takes rows r, r+R, ...), so the union of all ranks' batches is the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__()
        if batch_size % num_replicas:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {num_replicas}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start_batch = 0
        self.last_index = -1  # index of the batch the loop consumed last
        self._yielded: deque[int] = deque()  # indices yielded and not yet consumed by the loop
        self.skipped: set[tuple[int, int]] = set()

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return [b[self.rank::self.num_replicas] for b in batches]

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_for_epoch(self.epoch)
        # A new queue per iteration: an abandoned iterator (a rollback restarts the epoch) leaves
        # no stale indices behind.
        yielded = self._yielded = deque()
        for index in range(self.start_batch, len(batches)):
            if (self.epoch, index) not in self.skipped:
                yielded.append(index)
                yield batches[index]

    def consume(self) -> int:
        """The index of the batch the loop has just received; call once per batch received."""
        if not self._yielded:
            raise RuntimeError("consume() was called for more batches than the sampler yielded; call it "
                               "once per batch received from a DataLoader iterating this sampler")
        self.last_index = self._yielded.popleft()
        return self.last_index

    def __len__(self) -> int:
        return len(self.batches_for_epoch(self.epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "skipped": sorted(self.skipped),
                "seed": self.seed, "batch_size": self.batch_size, "n": self.n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"data position was saved for n={state['n']}, batch_size={state['batch_size']}; "
                             f"this loader has n={self.n}, batch_size={self.batch_size}")
        self.epoch, self.start_batch, self.seed = state["epoch"], state["start_batch"], state["seed"]
        self.skipped = {tuple(x) for x in state["skipped"]}  # type: ignore[misc]


def load_arrays(config: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(x_train, y_train, x_val, y_val, n_classes) for the configured bundled data set."""
    if config.dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = np.asarray(bunch.data, dtype=np.float32) / 16.0
        y = np.asarray(bunch.target, dtype=np.int64)
    else:
        rng = np.random.default_rng(config.split_seed)
        x = rng.standard_normal((config.synthetic_samples, config.synthetic_features)).astype(np.float32)
        w = rng.standard_normal((config.synthetic_features, 10)).astype(np.float32)
        y = np.argmax(np.tanh(x @ w) + 0.1 * rng.standard_normal((len(x), 10)), axis=1).astype(np.int64)
    order = np.random.default_rng(config.split_seed).permutation(len(x))
    n_val = int(round(len(x) * config.val_fraction))
    val, train = order[:n_val], order[n_val:]
    n_classes = int(y.max()) + 1
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[val]),
            torch.from_numpy(y[val]), n_classes)


def worker_in_own_group(_worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: the worker leaves its rank's process group.

    Why: torchrun stops a rank by signalling its whole process group, and Ctrl-C reaches the whole
    foreground group. The rank's main process turns the signal into a stop after the current step
    (under torchrun, at the next vote), which may still need batches; a worker killed by the same
    signal makes the main process die of "DataLoader worker killed by signal" instead, with no stop
    checkpoint. The workers still end with their loader, and on their own when the main process dies
    (each watches its parent)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted here: the worker stays in the group, as without this
        pass


def make_loaders(config: DataConfig, *, seed: int, num_replicas: int = 1, rank: int = 0, pin_memory: bool = False
                 ) -> tuple[DataLoader[Any], DataLoader[Any], int, int]:
    """Train loader (resumable sampler), validation loader, input features, classes. `pin_memory` for
    batches bound for a GPU: their copy then runs beside the step."""
    x_tr, y_tr, x_va, y_va, n_classes = load_arrays(config)
    sampler = ResumableBatchSampler(len(x_tr), config.batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
    # Fresh workers each epoch: the trainer rebuilds the iterator from a known RNG state (see
    # `TolariaTrainer._epoch_batches`); persistent workers would keep seeds from before a resume.
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_sampler=sampler, num_workers=config.num_workers,
                       persistent_workers=False, pin_memory=pin_memory, worker_init_fn=worker_in_own_group)
    val = DataLoader(TensorDataset(x_va, y_va), batch_size=512, shuffle=False, pin_memory=pin_memory)
    return train, val, int(x_tr.shape[1]), n_classes
