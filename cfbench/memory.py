"""The replay buffer every memory-based strategy shares: device-resident, fixed rules.

A ``Memory`` holds inputs as the task data stores them (uint8 pixels, token ids), global labels
and task indices (plus, optionally, one float payload per sample, such as the logits DER
stores) on the device the data lives on. What it keeps is decided by one of three selection
rules:

- ``reservoir``: a uniform sample of every stream sample offered so far (Vitter's algorithm R,
  vectorised per minibatch), in ``memory`` slots. Fed with ``add_stream``.
- ``class-balanced``: the same number of slots for every class seen, random within the class;
  older classes shrink as new ones arrive. Fed once per task with ``add_task``.
- ``per-task``: the same for every task seen (Hsu et al. 2018's naive rehearsal: memory //
  tasks seen random samples per task). Fed once per task with ``add_task``.

Capacity is exactly one of ``memory`` (total slots: each class or task gets ``memory //
groups seen``, the floor, as Hsu et al.'s code does), ``per_class`` (slots per class; with
``per-task`` selection a task gets ``per_class`` times its number of classes) or ``fraction``
(of every class's or task's training samples, kept for good). Reservoir needs ``memory``.
"""

from __future__ import annotations

from typing import Literal

import torch

from cfbench.strategy import Batch, TrainContext, TrainData

Selection = Literal["reservoir", "class-balanced", "per-task"]


def check_capacity(selection: str, memory: int | None, per_class: int | None,
                   fraction: float | None) -> None:
    """Raise ValueError naming the hyperparameter unless exactly one capacity is valid."""
    if selection not in ("reservoir", "class-balanced", "per-task"):
        raise ValueError(f"selection must be reservoir, class-balanced or per-task, got "
                         f"{selection!r}")
    given = [name for name, value in (("memory", memory), ("per_class", per_class),
                                      ("fraction", fraction)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of memory, per_class and fraction (got "
                         f"{', '.join(given) or 'none'}); e.g. memory=none per_class=20")
    if memory is not None and memory <= 0:
        raise ValueError(f"memory must be a positive number of samples, got {memory}")
    if per_class is not None and per_class <= 0:
        raise ValueError(f"per_class must be a positive number of samples, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if selection == "reservoir" and memory is None:
        raise ValueError("selection=reservoir needs a total memory size (memory=N), not "
                         f"{given[0]}")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.element_size() * t.numel()


class Memory:
    """A bounded buffer of past samples under one selection rule (see the module doc).

    ``data`` is what is stored (a ``TrainData``, ready for ``ctx.make_batch``), ``payload`` the
    per-sample floats stored with it or None. All randomness comes from the generator passed in.
    """

    def __init__(self, *, selection: Selection, memory: int | None = None,
                 per_class: int | None = None, fraction: float | None = None) -> None:
        check_capacity(selection, memory, per_class, fraction)
        self.selection = selection
        self.memory, self.per_class, self.fraction = memory, per_class, fraction
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._task: torch.Tensor | None = None
        self._payload: torch.Tensor | None = None
        self._size = 0
        self.seen = 0
        """Stream samples offered to the reservoir so far."""
        self._group_seen: dict[int, int] = {}
        self._group_classes: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return self._size

    @property
    def data(self) -> TrainData:
        if self._x is None:
            raise RuntimeError("the memory is empty")
        n = self._size
        return TrainData(self._x[:n], self._y[:n], self._task[:n])

    @property
    def payload(self) -> torch.Tensor | None:
        return None if self._payload is None else self._payload[:self._size]

    @property
    def capacity(self) -> int:
        """Total slots: ``memory`` when that is the budget, else what is stored now."""
        return self.memory if self.memory is not None else self._size

    def nbytes(self) -> int:
        """Bytes the buffer holds (the reservoir's slots are allocated once, in full)."""
        return sum(_nbytes(t) for t in (self._x, self._y, self._task, self._payload))

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of min(k, len) distinct stored samples, uniformly at random, on the device."""
        perm = torch.randperm(self._size, generator=generator)[:k]
        return perm.to(self._y.device)

    # -- reservoir ------------------------------------------------------------------------

    def add_stream(self, data: TrainData, generator: torch.Generator,
                   payload: torch.Tensor | None = None) -> None:
        """Offer a minibatch of stream samples to the reservoir (algorithm R, vectorised).

        Sample j of the stream (0-based) takes slot j while the buffer fills, then replaces a
        uniformly drawn slot r in [0, j] if r < memory. Slots are computed on the host from
        ``seen`` and the generator, so the device is never synchronised with. When two samples
        of one minibatch draw the same slot the later one wins, exactly as one at a time.
        """
        if self.selection != "reservoir":
            raise RuntimeError("add_stream is for selection=reservoir; use add_task")
        n, cap = len(data), self.memory
        if self._x is None:
            self._allocate(data, payload, cap)
        position = torch.arange(self.seen, self.seen + n, dtype=torch.long)
        draw = (torch.rand(n, generator=generator, dtype=torch.float64)
                * (position + 1)).long()
        slot = torch.where(position < cap, position, draw)
        rows = torch.nonzero(slot < cap).squeeze(1)
        slot = slot[rows]
        # The last writer of each slot wins: sort by slot, then by row, keep each slot's last.
        order = torch.argsort(slot * n + rows)
        slot, rows = slot[order], rows[order]
        last = torch.ones(len(slot), dtype=torch.bool)
        last[:-1] = slot[1:] != slot[:-1]
        device = self._x.device
        slot, rows = slot[last].to(device), rows[last].to(device)
        self._x.index_copy_(0, slot, data.x.index_select(0, rows))
        self._y.index_copy_(0, slot, data.y.index_select(0, rows))
        self._task.index_copy_(0, slot, data.task.index_select(0, rows))
        if self._payload is not None:
            self._payload.index_copy_(0, slot, payload.index_select(0, rows))
        self.seen += n
        self._size = min(self.seen, cap)

    def _allocate(self, data: TrainData, payload: torch.Tensor | None, rows: int) -> None:
        def empty(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)

        self._x, self._y, self._task = empty(data.x), empty(data.y), empty(data.task)
        self._payload = None if payload is None else empty(payload)

    # -- per task -------------------------------------------------------------------------

    def add_task(self, data: TrainData, generator: torch.Generator,
                 payload: torch.Tensor | None = None) -> None:
        """Offer a whole task's samples at once.

        Reservoir: the task's samples are streamed in a random order. Class-balanced and
        per-task: each group (class or task) is given its quota under the rule, and a random
        quota of the stored and new samples of each group is kept; groups that already had
        more shrink to a random subset of what they stored.
        """
        if self.selection == "reservoir":
            order = torch.randperm(len(data), generator=generator).to(data.y.device)
            self.add_stream(TrainData(data.x[order], data.y[order], data.task[order]),
                            generator, None if payload is None else payload[order])
            return
        new_groups = (data.y if self.selection == "class-balanced" else data.task).cpu()
        ids, counts = torch.unique(new_groups, return_counts=True)
        for g, c in zip(ids.tolist(), counts.tolist(), strict=True):
            self._group_seen[g] = self._group_seen.get(g, 0) + c
        if self.selection == "per-task":
            for g in ids.tolist():
                classes = data.y[data.task == g].unique().tolist()
                self._group_classes.setdefault(g, set()).update(classes)
        if self._size:
            data = TrainData.cat([self.data, data])
            if payload is not None or self._payload is not None:
                if payload is None or self._payload is None:
                    raise ValueError("every add_task call must give a payload, or none may")
                payload = torch.cat([self.payload, payload])
        groups = (data.y if self.selection == "class-balanced" else data.task).cpu()
        keep = _random_quota(groups, self._quotas(), generator).to(data.y.device)
        self._x, self._y, self._task = data.x[keep], data.y[keep], data.task[keep]
        self._payload = None if payload is None else payload[keep]
        self._size = len(keep)

    def _quotas(self) -> torch.Tensor:
        """Slots each group may hold now, indexed by group id."""
        quota = torch.zeros(max(self._group_seen) + 1, dtype=torch.long)
        for g, seen in self._group_seen.items():
            if self.memory is not None:
                quota[g] = self.memory // len(self._group_seen)
            elif self.per_class is not None:
                n_classes = 1 if self.selection == "class-balanced" else len(
                    self._group_classes[g])
                quota[g] = self.per_class * n_classes
            else:
                quota[g] = round(self.fraction * seen)
        return quota


def _random_quota(groups: torch.Tensor, quota: torch.Tensor, generator: torch.Generator
                  ) -> torch.Tensor:
    """Indices of a uniformly random ``quota[g]`` members of every group g (all if fewer),
    sorted by group: shuffle, stable-sort by group, keep each group's first ``quota[g]``."""
    n = len(groups)
    perm = torch.randperm(n, generator=generator)
    by_group = torch.sort(groups[perm], stable=True)
    position = torch.arange(n)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = by_group.values[1:] != by_group.values[:-1]
    first = torch.cummax(torch.where(starts, position, 0), 0).values
    keep = (position - first) < quota[by_group.values]
    return perm[by_group.indices[keep]]


def batch_samples(ctx: TrainContext, batch: Batch) -> TrainData:
    """The stored inputs and global labels a training minibatch was made from: the exact
    inverse of ``ctx.make_batch`` (the scenario's objective, and the setting's label ->
    output-unit map), so a stream minibatch can be stored as compactly as the task data."""
    x = ctx.scenario.stored(batch.x)
    y = batch.y
    if ctx.setting.name == "domain":  # each sample's task's table, at each of its targets
        labels = _domain_labels(ctx)[batch.task]
        y = labels.gather(1, y.reshape(len(y), -1)).view(y.shape)
    return TrainData(x, y, batch.task)


def _domain_labels(ctx: TrainContext) -> torch.Tensor:
    """(task, output unit) -> global label in the domain setting, built once per context."""
    table = ctx.extra.get("memory.domain_labels")
    if table is None:
        tasks = ctx.scenario.tasks
        table = torch.full((len(tasks), ctx.setting.n_outputs), -1, dtype=torch.long)
        for t, task in enumerate(tasks):
            table[t, :len(task.classes)] = torch.tensor(task.classes)
        table = ctx.extra["memory.domain_labels"] = table.to(ctx.device)
    return table
