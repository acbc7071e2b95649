"""Generative replay: a generator trained on the stream stands in for a memory of old data."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.models import mlp
from cfbench.registry import register_strategy
from cfbench.scenario import Classification, Scenario, Task, apply_mask
from cfbench.strategy import Batch, Strategy, TrainContext, routed_by


class VAE(nn.Module):
    """MLP variational autoencoder over flattened pixel intensities in [0, 1].

    Bernoulli likelihood: the decoder outputs one logit per pixel and its sigmoid, the pixel's
    mean, is what gets replayed. The loss is the negative ELBO per sample: binary cross-entropy
    summed over pixels plus KL(q(z|x) || N(0, I)) summed over latent units.
    """

    def __init__(self, n_pixels: int, hidden: tuple[int, ...], latent: int) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = mlp(n_pixels, hidden, 2 * latent)
        self.decoder = mlp(latent, tuple(reversed(hidden)), n_pixels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def loss(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Per-sample negative ELBO with one reparameterised draw of z."""
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=rng, device=mu.device, dtype=mu.dtype)
        z = mu + noise * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon + kl

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample binary cross-entropy of the reconstruction from the posterior mean."""
        logits = self.decoder(self.encode(x)[0])
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


@torch.no_grad()
def generate(decoder: nn.Module, latent: int, n: int, rng: torch.Generator) -> torch.Tensor:
    """`n` flattened images in [0, 1]: the decoder's pixel means at z ~ N(0, I)."""
    device = next(decoder.parameters()).device
    return torch.sigmoid(decoder(torch.randn(n, latent, generator=rng, device=device)))


@dataclasses.dataclass
class ReplayedBatch(Batch):
    """A minibatch with generated rows, and what the replay loss needs to know about them: which
    rows they are and (targets="soft") the teacher's tempered distributions over them. A
    composed part that appends rows keeps this type (``dataclasses.replace``), so the rows it
    adds count as current samples."""

    replayed: slice
    soft_targets: torch.Tensor | None


def _bytes(module: nn.Module) -> int:
    return sum(p.element_size() * p.numel() for p in module.parameters())


@register_strategy("generative-replay", family="replay",
                   reference="Shin et al. 2017; VAE generator and distillation: van de Ven & "
                             "Tolias 2018")
class GenerativeReplay(Strategy):
    """Deep generative replay: samples of a VAE, labelled by the old solver, stand in for old data.

    Each minibatch of task t > 0 gets as many generated inputs, labelled by a frozen eval-mode
    copy of the solver as it was before task t. `targets="hard"`: its argmax over the units of
    the tasks seen before (in the task setting over the units of an old task drawn at random
    per sample, which is then the sample's task; in the domain setting over all units).
    `targets="soft"`: distillation, T**2 * cross-entropy(softmax(old / T), softmax(new / T))
    with T = temperature and zero target mass on units the old solver was not asked about
    (van de Ven & Tolias 2018, "DGR+distill").

    Weighting (van de Ven & Tolias): with t tasks seen, current one included, the loss is
    1/t * CE(current samples) + (t-1)/t * replay loss, each a mean over its own samples, so
    old and new tasks weigh about the same. That needs the minibatch's split, so this strategy
    owns the `loss` hook (it does not compose with another strategy that owns it).

    The VAE trains in `after_task` (not on the last task, whose generator nothing would use),
    on the task's data mixed 1/t : (t-1)/t with as many samples of its own frozen pre-task
    copy, so it learns the new task without forgetting the old ones while the solver always
    trains against a fixed replay distribution. That is real work in wall-clock time but
    outside the solver's steps, so not in the run's FLOP count (sampling and labelling the
    replay inside the steps is counted). The VAE is initialised and sampled from generators
    seeded from `ctx.generator`: the solver's initialisation and minibatch order are naive's.

    Hyperparameters:
    - targets / temperature: hard labels (Shin et al.), or distillation, which also passes on
      the old solver's uncertainty about blurry samples.
    - generator_iterations: VAE steps per task; None means as many as the solver took on the
      task. More steps give sharper samples for more wall-clock time.
    - generator_hidden / generator_latent / generator_lr: the VAE's widths (default: van de
      Ven's MNIST VAE, 400-400 and 100 latent units) and Adam learning rate; a bigger VAE
      models more tasks but learns slower per step and costs time and state.
    """

    def __init__(self, *, targets: Literal["hard", "soft"] = "hard", temperature: float = 2.0,
                 generator_iterations: int | None = None,
                 generator_hidden: tuple[int, ...] = (400, 400), generator_latent: int = 100,
                 generator_lr: float = 1e-3) -> None:
        if targets not in ("hard", "soft"):
            raise ValueError(f"targets must be 'hard' or 'soft', got {targets!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if generator_iterations is not None and generator_iterations <= 0:
            raise ValueError(f"generator_iterations must be positive or none, got "
                             f"{generator_iterations}")
        if not generator_hidden or any(h <= 0 for h in generator_hidden):
            raise ValueError(f"generator_hidden must be one or more positive widths, got "
                             f"{generator_hidden}")
        if generator_latent <= 0:
            raise ValueError(f"generator_latent must be positive, got {generator_latent}")
        if not generator_lr > 0:
            raise ValueError(f"generator_lr must be > 0, got {generator_lr}")
        self.targets, self.temperature = targets, temperature
        self.generator_iterations = generator_iterations
        self.hidden, self.latent, self.lr = tuple(generator_hidden), generator_latent, generator_lr
        self.vae: VAE | None = None
        self.rng: torch.Generator | None = None
        self.teacher: nn.Module | None = None
        self._first_step = 0

    def refuses(self, scenario: Scenario) -> str | None:
        if not isinstance(scenario.objective, Classification):
            return ("its generator (a VAE over pixels) draws images, and this scenario's "
                    "samples are not images")
        return None

    def setup(self, ctx: TrainContext) -> None:
        seed = int(torch.randint(2**62, (), generator=ctx.generator))
        with torch.random.fork_rng(devices=[]):  # own initialisation, global RNG untouched
            torch.manual_seed(seed)
            self.vae = VAE(math.prod(ctx.scenario.input_shape), self.hidden, self.latent)
        self.vae.to(ctx.device)
        self.rng = torch.Generator(ctx.device).manual_seed(seed)
        self.teacher = None

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        self._first_step = ctx.step
        if ctx.task_index > 0:
            self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)
            for p in self.teacher.parameters():
                p.grad = None

    def _old_units(self, ctx: TrainContext, task: torch.Tensor) -> torch.Tensor | None:
        """Units the old solver may label a replayed sample with (None: all)."""
        if ctx.setting.name == "class":
            return ctx.setting.seen_masks[ctx.task_index - 1].expand(len(task), -1)
        return ctx.setting.mask(task, ctx.task_index - 1)

    def batch(self, ctx: TrainContext, batch: Batch) -> Batch:
        if self.teacher is None:
            return batch
        n, scenario = len(batch.y), ctx.scenario
        pixels = generate(self.vae.decoder, self.latent, n, self.rng)
        x = scenario.normalise(pixels.view(n, *scenario.input_shape))
        task = torch.randint(ctx.task_index, (n,), generator=self.rng, device=ctx.device)
        with torch.no_grad(), routed_by(task):
            scores = apply_mask(self.teacher(x), self._old_units(ctx, task))
        soft = torch.softmax(scores / self.temperature, dim=1) if self.targets == "soft" else None
        return ReplayedBatch(torch.cat((batch.x, x)), torch.cat((batch.y, scores.argmax(1))),
                             torch.cat((batch.task, task)), slice(len(batch.y), len(batch.y) + n),
                             soft)

    def loss(self, ctx: TrainContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """1/t * CE on the task's samples + (t-1)/t * replay loss (rows added by `batch`;
        rows another composed strategy appends after them count as current samples)."""
        if not isinstance(batch, ReplayedBatch):
            return ctx.loss(logits, batch)
        r = batch.replayed
        current = F.cross_entropy(torch.cat((logits[:r.start], logits[r.stop:])),
                                  torch.cat((batch.y[:r.start], batch.y[r.stop:])))
        if self.targets == "hard":
            replay = F.cross_entropy(logits[r], batch.y[r])
        else:
            log_q = F.log_softmax(logits[r] / self.temperature, dim=1)
            soft = batch.soft_targets
            log_q = log_q.masked_fill(soft == 0, 0.0)  # 0 * -inf on masked units
            replay = self.temperature**2 * -(soft * log_q).sum(1).mean()
        t = ctx.task_index + 1
        return current / t + replay * (t - 1) / t

    def after_task(self, ctx: TrainContext, task: Task) -> None:
        """Train the VAE on this task's data plus replay from its own pre-task copy."""
        t = ctx.task_index + 1
        if t == len(ctx.scenario.tasks):
            return
        iterations = self.generator_iterations or ctx.step - self._first_step
        previous = copy.deepcopy(self.vae.decoder).requires_grad_(False) if t > 1 else None
        optimizer = torch.optim.Adam(self.vae.parameters(), lr=self.lr)
        size = ctx.scenario.protocol.batch_size
        for _ in range(iterations):
            idx = torch.randint(len(task.y_train), (size,), generator=self.rng,
                                device=ctx.device)
            loss = self.vae.loss(task.x_train[idx].flatten(1).float() / 255.0, self.rng).mean()
            if previous is not None:
                old = generate(previous, self.latent, size, self.rng)
                loss = loss / t + self.vae.loss(old, self.rng).mean() * (t - 1) / t
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def state_bytes(self) -> int:
        """The VAE, the frozen solver copy and the frozen decoder copy (held while the VAE
        trains)."""
        if self.vae is None:
            return 0
        teacher = _bytes(self.teacher) if self.teacher is not None else 0
        return _bytes(self.vae) + _bytes(self.vae.decoder) + teacher
