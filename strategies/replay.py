"""Rehearsal strategies: keep a small memory of past samples and train with it.

Experience replay mixes memory samples into training; DER and DER++ also match the logits the
network gave them when they were stored; A-GEM and GEM use the memory only to constrain the
direction of each update. All keep their samples in one ``cfbench.memory.Memory``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cfbench.memory import Memory, Selection, batch_samples
from cfbench.registry import register_strategy
from cfbench.scenario import Classification, Scenario, Task, apply_mask
from cfbench.strategy import Batch, Stacked, Strategy, TrainContext, TrainData
from cfbench.taps import Tap
from cfbench.train import autocast


def _check_batch_size(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive number of samples or none, got {value}")


def _trainable(ctx: TrainContext) -> list[torch.nn.Parameter]:
    return [p for p in ctx.model.parameters() if p.requires_grad]


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's .grad, created as zeros where backward left none."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _memory_gradient(ctx: TrainContext, params: list[torch.nn.Parameter], data: TrainData,
                     idx: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the task loss on memory samples ``idx``, leaving every .grad untouched (its
    forward in the precision the step's forward ran in)."""
    batch = ctx.make_batch(data, idx)
    with autocast(ctx.scenario.protocol, ctx.device):
        loss = ctx.loss(ctx.logits(batch), batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _with_memory(data: TrainData, buffer: Memory, oversample: bool) -> TrainData:
    """The task's data plus the memory, repeated max(len(data) // capacity, 1) times with
    `oversample` (Hsu et al.'s code: old and new samples about 1:1), else once."""
    if not len(buffer):
        return data
    copies = max(len(data) // buffer.capacity, 1) if oversample else 1
    return TrainData.cat([data] + [buffer.data] * copies)


class _Rehearsal(Strategy):
    """What every strategy here shares: one memory, whose bytes are the state kept.

    Rebuilt memories (class-balanced, per-task) take each task's samples at its end. A
    reservoir is fed the stream minibatch of every step in an after-hook; a task learned
    without steps (a transfer source) offers its whole training set at its end instead, so the
    source is remembered too.
    """

    def __init__(self, buffer: Memory) -> None:
        self.buffer = buffer
        self._seen_at_start = 0

    def refuses(self, scenario: Scenario) -> str | None:
        if (self.buffer.selection == "class-balanced"
                and not isinstance(scenario.objective, Classification)):
            return ("a class-balanced memory keeps as many samples of every label, and here a "
                    "label is the next token, so rare symbols would be replayed as often as "
                    "spaces; use --hp selection=per-task (or reservoir)")
        return None

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self._seen_at_start = self.buffer.seen

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        streamed = self.buffer.seen > self._seen_at_start
        if self.buffer.selection != "reservoir" or not streamed:
            data = ctx.task_data(ctx.task_index)
            self.buffer.add_task(data, ctx.generator, self.payload(ctx, data))

    def payload(self, ctx: TrainContext, data: TrainData) -> torch.Tensor | None:
        """What is stored with each sample besides itself (DER: the network's logits)."""
        return None

    def state_bytes(self) -> int:
        return self.buffer.nbytes()


@register_strategy("replay", family="replay",
                   reference="Chaudhry et al. 2019 (ER); Hsu et al. 2018 (naive rehearsal)")
class Replay(_Rehearsal):
    """Experience replay: train on memory samples alongside the task's own.

    `mix="batch"` appends a memory minibatch of `replay_batch_size` (default: the protocol's
    batch size) to every minibatch and takes one cross-entropy over both (Chaudhry et al.'s
    ER). `mix="dataset"` trains on the union of the task's data and the memory, so an epoch is
    a pass over both (Hsu et al.'s naive rehearsal); with `oversample` the memory is repeated
    max(task size // memory, 1) times, as Hsu et al.'s code does, so old and new samples come
    about 1:1 (without it, a small memory is a small share of every epoch).

    The memory: `selection` and one of `memory` (total samples), `per_class`, `fraction` (of
    each past class or task); see ``cfbench.memory``. A reservoir is fed each stream minibatch
    with mix="batch" (after the memory minibatch is drawn, so no sample is replayed alongside
    itself) or, with mix="dataset", each task's samples at its end in a random order;
    class-balanced and per-task memories are rebuilt at the end of each task. More memory
    forgets less and costs more state; larger replay batches cost more compute per step.
    Hsu et al.'s Split-MNIST setting: selection=per-task memory=1100 (or 4400) mix=dataset.
    """

    stacked = Stacked  # batch and after_step read no parameters: seeds stack

    def __init__(self, *, memory: int | None = 500, per_class: int | None = None,
                 fraction: float | None = None, selection: Selection = "reservoir",
                 mix: Literal["batch", "dataset"] = "batch",
                 replay_batch_size: int | None = None, oversample: bool = True) -> None:
        _check_batch_size("replay_batch_size", replay_batch_size)
        if mix not in ("batch", "dataset"):
            raise ValueError(f"mix must be batch or dataset, got {mix!r}")
        super().__init__(Memory(selection=selection, memory=memory, per_class=per_class,
                                fraction=fraction))
        self.mix, self.replay_batch_size, self.oversample = mix, replay_batch_size, oversample

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        return data if self.mix == "batch" else _with_memory(data, self.buffer, self.oversample)

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        if self.mix == "dataset" or not len(self.buffer):
            return batch
        size = self.replay_batch_size or ctx.scenario.protocol.batch_size
        past = ctx.make_batch(self.buffer.data, self.buffer.sample(size, ctx.generator))
        return dataclasses.replace(batch, **{f: torch.cat([getattr(batch, f), getattr(past, f)])
                                             for f in ("x", "y", "task")})

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        """A reservoir takes the step's stream samples (after the memory minibatch was drawn,
        so no sample is replayed alongside itself)."""
        if self.mix == "batch" and self.buffer.selection == "reservoir":
            self.buffer.add_stream(batch_samples(ctx, batch), ctx.generator)

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        if self.mix == "dataset":
            self.buffer.add_task(ctx.task_data(ctx.task_index), ctx.generator)
        else:
            super().after_task(ctx, task)


@register_strategy("der", family="replay", reference="Buzzega et al. 2020 (DER)")
class DER(_Rehearsal):
    """Dark experience replay: a reservoir of samples with the logits the network gave them
    when they were stored; the penalty alpha * MSE(current logits, stored logits) on a memory
    minibatch pulls today's function toward its past self on past data.

    Logits here are the network's full, unmasked output (the paper's h(x)), MSE the mean over
    sample x output unit as in the authors' code: in the class setting that includes units of
    classes not seen when a sample was stored, whose values DER keeps for it (storing only
    the masked logits leaves old samples free to drift toward new classes). The loop passes
    masked logits, so the full output is read from the loop's own forward pass through a tap
    on the model (no second forward, and a batch-norm model's running statistics are updated
    once per step, not twice). The penalty only reads the memory; the step's stream samples go
    into the reservoir in ``after_backward``, with the logits the step's forward gave them
    (before the update). Defaults: Buzzega et al.'s Seq-MNIST setting with a
    500-sample buffer (alpha=1.0, memory minibatch = batch size). Larger alpha keeps the old
    function more tightly; a larger memory forgets less and keeps more state.
    """

    def __init__(self, *, memory: int = 500, alpha: float = 1.0,
                 replay_batch_size: int | None = None) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        _check_batch_size("replay_batch_size", replay_batch_size)
        super().__init__(Memory(selection="reservoir", memory=memory))
        self.alpha, self.beta, self.replay_batch_size = alpha, 0.0, replay_batch_size
        self._tap: Tap | None = None

    def penalty(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor
                ) -> torch.Tensor | None:
        if not len(self.buffer):
            return None
        size = self.replay_batch_size or ctx.scenario.protocol.batch_size
        idx = self.buffer.sample(size, ctx.generator)
        parts = [idx, self.buffer.sample(size, ctx.generator)] if self.beta else [idx]
        past = ctx.make_batch(self.buffer.data, torch.cat(parts))
        with self._tap.aside() if self._tap is not None else contextlib.nullcontext():
            out = ctx.forward(past)  # the tap keeps the step's own forward for after_backward
        n = len(idx)
        term = self.alpha * F.mse_loss(out[:n], self.buffer.payload[idx])
        if self.beta:
            masked = apply_mask(out[n:], ctx.setting.mask(past.task[n:], ctx.task_index))
            term = term + self.beta * ctx.scenario.objective.loss(masked, past.y[n:])
        return term

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        """The stream samples join the reservoir with the logits the step's forward gave them
        (read before the update changes the function)."""
        self.buffer.add_stream(batch_samples(ctx, batch), ctx.generator,
                               self._stream_output(ctx, batch))

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        super().before_task(ctx, task)
        self._tap_output(ctx.model)

    def _tap_output(self, model: torch.nn.Module) -> None:
        self._untap()
        self._tap = Tap(model, {"output": (model, False)})

    def _stream_output(self, ctx: TrainContext, batch: Batch) -> torch.Tensor:
        """The model's full output on the step's batch, as the loop's forward computed it (run
        again only where the tap missed it: a model replaced after this part's before_task)."""
        if self._tap is None or self._tap.model is not ctx.model:
            self._tap_output(ctx.model)
        with torch.no_grad():
            return self._tap.read(batch)["output"].detach()

    def _untap(self) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        self._untap()  # evaluation and later copies of the model see it untapped
        super().after_task(ctx, task)

    @torch.no_grad()
    def payload(self, ctx: TrainContext, data: TrainData) -> torch.Tensor:
        """The logits of a whole task (in eval mode: the function as it was learned)."""
        model, size = ctx.model, ctx.scenario.protocol.eval_batch_size
        was_training = model.training
        model.eval()
        logits = torch.cat([model(ctx.make_batch(data, slice(i, i + size)).x)
                            for i in range(0, len(data), size)])
        model.train(was_training)
        return logits


@register_strategy("der++", family="replay", reference="Buzzega et al. 2020 (DER++)")
class DERpp(DER):
    """DER++: DER plus beta * cross-entropy on the labels of a second, independently drawn
    memory minibatch, which corrects logits stored before the network had learned a sample
    well. Defaults: Buzzega et al.'s Seq-MNIST setting with a 500-sample buffer (alpha=1.0,
    beta=0.5).
    """

    def __init__(self, *, memory: int = 500, alpha: float = 1.0, beta: float = 0.5,
                 replay_batch_size: int | None = None) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        super().__init__(memory=memory, alpha=alpha, replay_batch_size=replay_batch_size)
        self.beta = beta


@register_strategy("agem", family="replay", reference="Chaudhry et al. 2019 (A-GEM)")
class AGEM(_Rehearsal):
    """Averaged GEM: never let an update increase the loss on a memory minibatch, to first
    order. With g the minibatch gradient and g_ref the gradient on `ref_batch_size` memory
    samples (all trainable parameters flattened), if g.g_ref < 0 the update is
    g - (g.g_ref / g_ref.g_ref) g_ref, whose dot product with g_ref is zero.

    g_ref is computed with ``torch.autograd.grad`` in ``after_backward`` (the parameters are
    still those of the step's forward) and the projection applied there, without a host
    synchronisation; a reservoir memory takes the stream samples in ``after_step``.
    Defaults: Chaudhry et al.'s MNIST setting, 25 samples per class, updated at the end of
    each task, and a 256-sample reference batch. A larger reference batch gives a less noisy
    constraint at more compute per step.
    """

    def __init__(self, *, memory: int | None = None, per_class: int | None = 25,
                 fraction: float | None = None, selection: Selection = "class-balanced",
                 ref_batch_size: int = 256) -> None:
        _check_batch_size("ref_batch_size", ref_batch_size)
        super().__init__(Memory(selection=selection, memory=memory, per_class=per_class,
                                fraction=fraction))
        self.ref_batch_size = ref_batch_size

    def reference(self, ctx: TrainContext) -> list[torch.Tensor]:
        """g_ref, per trainable parameter: the task loss's gradient on `ref_batch_size` memory
        samples drawn from ``ctx.generator``."""
        idx = self.buffer.sample(self.ref_batch_size, ctx.generator)
        return _memory_gradient(ctx, _trainable(ctx), self.buffer.data, idx)

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        if not len(self.buffer):
            return
        ref = self.reference(ctx)
        grads = _grads(_trainable(ctx))
        dot = torch.stack([(g * r).sum() for g, r in zip(grads, ref, strict=True)]).sum()
        norm2 = torch.stack([r.pow(2).sum() for r in ref]).sum()
        scale = torch.where(dot < 0, dot / norm2, torch.zeros_like(dot))
        for g, r in zip(grads, ref, strict=True):
            g.sub_(r * scale)

    def after_step(self, ctx: TrainContext, batch: Batch) -> None:
        if self.buffer.selection == "reservoir":
            self.buffer.add_stream(batch_samples(ctx, batch), ctx.generator)


def gem_dual(G: torch.Tensor, g: torch.Tensor, margin: float) -> np.ndarray:
    """The GEM dual solution v: argmin over v >= margin of 1/2 v'GG'v + (Gg)'v.

    That objective is 1/2 ||G'v + g||^2 up to a constant. With the thin QR factorisation
    G' = QR (R is t x t) it is 1/2 ||Rv + Q'g||^2 plus a constant, so with v = margin + w the
    problem is the t-dimensional non-negative least squares min_{w>=0} ||Rw - b||,
    b = -(R margin + Q'g), which scipy's active-set NNLS solves exactly (to round-off). No
    diagonal regularisation is needed, even when past gradients are linearly dependent.
    """
    from scipy.optimize import nnls  # slow to import, and only GEM needs it

    q, r = torch.linalg.qr(G.double().T)
    b = -(r.sum(1) * margin + q.T @ g.double())
    w, _ = nnls(r.cpu().numpy(), b.cpu().numpy())
    return w + margin


def gem_project(G: torch.Tensor, g: torch.Tensor, margin: float) -> torch.Tensor:
    """GEM's update: g itself if no past-task gradient (rows of G) has a negative dot product
    with it, else g + G'v with v the dual solution (so that G(g + G'v) >= 0)."""
    if not bool((G @ g < 0).any()):
        return g
    v = torch.from_numpy(gem_dual(G, g, margin)).to(G)
    return g + v @ G


@register_strategy("gem", family="replay",
                   reference="Lopez-Paz & Ranzato 2017 (GEM); defaults: Hsu et al. 2018's GEM_1100")
class GEM(_Rehearsal):
    """Gradient episodic memory: an update may not increase the loss on any past task's
    memory, to first order. Each step computes one gradient per past task on all of that
    task's memory samples; if any has a negative dot product with the minibatch gradient g,
    g is replaced by g + G'v, where v solves GEM's dual QP min 1/2 v'GG'v + (Gg)'v subject to
    v >= margin (the authors' code puts the margin on v; margin > 0 pushes the update toward
    every past task's gradient, not just onto the boundary). The dual is solved exactly, see
    ``gem_dual``.

    The memory is split equally among the tasks seen (per-task selection; `memory` total,
    `per_class` or `fraction`), updated at the end of each task, as in Hsu et al.'s code.
    `rehearse` also trains on the task's data plus the (oversampled) memory, like replay's
    mix="dataset": Hsu et al.'s GEM_1100 and GEM_4400 do (their GEM inherits naive
    rehearsal's training set; only their GEM_orig does not). The defaults are their GEM_1100
    (1100 samples, margin 0.5, rehearse); rehearse=false is the original GEM's update alone,
    whose margin, adding at least margin x every past task's gradient at each violation,
    costs plasticity in the class setting as tasks accumulate. Past-task gradients and the
    projection are computed in ``after_backward``; the check for violated constraints and the
    QP need the host once per step. Cost per step grows with the memory size.
    """

    def __init__(self, *, memory: int | None = 1100, per_class: int | None = None,
                 fraction: float | None = None, margin: float = 0.5,
                 rehearse: bool = True) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        super().__init__(Memory(selection="per-task", memory=memory, per_class=per_class,
                                fraction=fraction))
        self.margin, self.rehearse = margin, rehearse
        self._rows: list[torch.Tensor] = []

    def train_data(self, ctx: TrainContext, task: Task, data: TrainData) -> TrainData:
        return _with_memory(data, self.buffer, oversample=True) if self.rehearse else data

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        super().after_task(ctx, task)
        tasks = self.buffer.data.task
        rows = [torch.nonzero(tasks == t).squeeze(1) for t in range(ctx.task_index + 1)]
        self._rows = [r for r in rows if len(r)]

    def past_gradients(self, ctx: TrainContext) -> torch.Tensor:
        """G: one row per past task, the task loss's gradient on all of that task's memory
        (every trainable parameter, flattened)."""
        params = _trainable(ctx)
        return torch.stack([
            torch.cat([g.reshape(-1) for g in _memory_gradient(ctx, params, self.buffer.data,
                                                               rows)])
            for rows in self._rows])

    def after_backward(self, ctx: TrainContext, batch: Batch) -> None:
        if not self._rows:
            return
        past = self.past_gradients(ctx)
        grads = _grads(_trainable(ctx))
        flat = torch.cat([g.reshape(-1) for g in grads])
        projected = gem_project(past, flat, self.margin)
        if projected is not flat:
            for g, piece in zip(grads, projected.split([g.numel() for g in grads]), strict=True):
                g.copy_(piece.view_as(g))
