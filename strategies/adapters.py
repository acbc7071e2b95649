"""Parameter-efficient and architectural strategies: LoRA, bottleneck adapters, progressive nets.

All three leave the parameters that earlier tasks rely on untouched and train new ones instead.

**One parameter set per task.** In the task setting each strategy adds a set of new parameters
for every task (LoRA's low-rank pairs, an adapter's projections, a progressive column) and each
sample goes through the set of *its own* task. The model's forward only receives inputs, so the
new modules read the task ids of the batch being forwarded from ``cfbench.strategy.
forward_tasks``, which ``TrainContext.forward`` (and so ``ctx.logits``) sets for the length of
each forward pass: the loop's, the evaluator's, a teacher's, one on replayed memory samples each
route by their own batch, whatever the order of a composition (``lora+replay`` is
``replay+lora``). A forward pass outside it (``model(x)`` in a user's loop) uses the set of the
task being trained for every sample. Selection is vectorised: all sets run side by side as one
wider layer and each sample's hidden units outside its own set are zeroed, so its output depends
on its own set only (the others add exact zeros) at the cost of running every set.

**A frozen base.** LoRA and adapters freeze every parameter of the backbone (``requires_grad``
off: no gradient, so no optimizer touches them; they stay bitwise unchanged) except, by default,
the head, and keep its batch-norm layers in eval mode while training: they normalise with their
stored statistics, which therefore stay unchanged too (otherwise each new task's data would move
the statistics and change what earlier tasks' adapters see). The loop puts the model in train
mode when a task starts, so those layers carry a forward pre-hook that puts them back in eval
mode at every forward pass (``cfbench.models.hold_in_eval``).

New parameters are drawn from ``ctx.generator`` (Kaiming-uniform, bound 1/sqrt(fan_in), the
``nn.Linear`` default), never from the global RNG; LoRA's and the adapters' matrices that map
back into the network start at zero, so adding them leaves the model's function exactly
unchanged. Each strategy declares parameter groups so that planning rejects
``reset_optimizer=False``: the parameters of a new task appear when it starts, and an optimizer
kept from the first task would never train them.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from cfbench.errors import CfbenchError
from cfbench.models import BasicBlock, has_running_stats, hold_in_eval, linear_shape, split_head
from cfbench.registry import register_strategy
from cfbench.scenario import Task
from cfbench.strategy import Strategy, TrainContext, forward_tasks


class Routing:
    """How the new modules pick a parameter set: per sample by task (`per_task`, from
    ``forward_tasks``) or set `default` for every sample; `generator` draws the adapters'
    dropout masks on the model's device."""

    def __init__(self) -> None:
        self.per_task = True
        self.default = 0
        self.generator: torch.Generator | None = None

    def task_ids(self, n: int) -> torch.Tensor | None:
        """The ids for a forward pass over `n` samples (None: use `default` for all)."""
        ids = forward_tasks() if self.per_task else None
        if ids is not None and len(ids) != n:
            raise CfbenchError(f"a per-task module got {n} samples inside the forward pass of "
                               f"a batch of {len(ids)}; call the model on the batch's inputs")
        return ids


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): ``nn.Linear``'s default (Kaiming-uniform, a=sqrt 5)
    drawn from `generator`."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator).to(device)


def n_bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class AdapterSet(nn.Module):
    """One task's branch parameters: `down` (width x in [x kh x kw]), `up` (out x width [x 1 x 1])
    and, for adapters, their biases."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: bool) -> None:
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.down_bias = nn.Parameter(down.new_zeros(len(down))) if bias else None
        self.up_bias = nn.Parameter(up.new_zeros(len(up))) if bias else None


class Branch(nn.Module):
    """Per-task two-layer branches, x -> scale * up(act(down(x))), one `AdapterSet` per task.

    Linear branches act on the last dimension. Convolutional ones act on channels (dimension 1):
    `down` is a convolution with the given kernel, stride, padding and dilation and `up` a 1x1
    convolution. The sets run as one layer `n_sets` times as wide (their `down` weights
    concatenated), each sample's hidden units outside its own set are zeroed, and one `up` over
    the concatenated sets maps back: no per-sample loop and no host synchronisation.
    """

    def __init__(self, routing: Routing, *, in_features: int, width: int, out_features: int,
                 conv: bool, kernel: tuple[int, ...] = (1, 1), stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = False, relu: bool = False, scale: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.routing = routing
        self.in_features, self.width, self.out_features = in_features, width, out_features
        self.conv, self.kernel = conv, tuple(kernel) if conv else ()
        self.conv_args = {"stride": stride, "padding": padding, "dilation": dilation}
        self.bias, self.relu, self.scale, self.dropout = bias, relu, scale, dropout
        self.sets = nn.ModuleList()

    def set_size(self) -> int:
        """Parameters in one set: width * (in * kh * kw + out) (+ width + out with biases)."""
        fan_in = self.in_features * math.prod(self.kernel)
        return self.width * (fan_in + self.out_features) + (
            self.width + self.out_features if self.bias else 0)

    def add_set(self, generator: torch.Generator, device: torch.device) -> None:
        fan_in = self.in_features * math.prod(self.kernel)
        one_by_one = (1, 1) if self.conv else ()
        down = kaiming_uniform((self.width, self.in_features, *self.kernel), fan_in, generator,
                               device)
        up = torch.zeros(self.out_features, self.width, *one_by_one, device=device)
        self.sets.append(AdapterSet(down, up, self.bias))

    def _along(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`v` (features last: (C,) or (N, C)) shaped to broadcast over `like`'s features."""
        if self.conv:
            return v.view(*v.shape, 1, 1)
        if v.dim() == 2:
            return v.view(v.shape[0], *(1,) * (like.dim() - 2), v.shape[1])
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The branch's output for `x`, or None where no set serves it yet."""
        sets = list(self.sets)
        ids = self.routing.task_ids(x.shape[0])
        if not sets:
            return None
        select = None
        if ids is None:
            k = self.routing.default
            if k >= len(sets):
                return None
            sets = sets[k:k + 1]
        else:
            select = (ids[:, None] == torch.arange(len(sets), device=ids.device)).to(x.dtype)
        if self.dropout and self.training:
            keep = torch.rand(x.shape, generator=self.routing.generator, device=x.device)
            x = x * (keep >= self.dropout) * (1.0 / (1.0 - self.dropout))
        down = torch.cat([s.down for s in sets])
        up = torch.cat([s.up for s in sets], dim=1)
        down_bias = torch.cat([s.down_bias for s in sets]) if self.bias else None
        if self.conv:
            h = F.conv2d(x, down, down_bias, **self.conv_args)
        else:
            h = F.linear(x, down, down_bias)
        if self.relu:
            h = torch.relu(h)
        if select is not None:
            h = h * self._along(select.repeat_interleave(self.width, dim=1), h)
        y = F.conv2d(h, up) if self.conv else F.linear(h, up)
        if self.bias:
            up_bias = (sets[0].up_bias if select is None
                       else select @ torch.stack([s.up_bias for s in sets]))
            y = y + self._along(up_bias, y)
        return y * self.scale if self.scale != 1.0 else y


class Branched(nn.Module):
    """`module` with a branch added to its output: fed the module's input (LoRA, in parallel)
    or its output (an adapter, in series with a residual connection)."""

    def __init__(self, module: nn.Module, branch: Branch, on_input: bool) -> None:
        super().__init__()
        self.module = module
        self.branch = branch
        self.on_input = on_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        delta = self.branch(x if self.on_input else y)
        return y if delta is None else y + delta


class Routed(Strategy):
    """What lora, adapter and progressive share: the routing their new modules read, and
    parameter groups of what is trainable now."""

    def __init__(self) -> None:
        self.routing = Routing()

    def param_groups(self, ctx: TrainContext) -> list[dict[str, Any]] | None:
        """Everything trainable now (new parameters appear per task; see the module doc)."""
        return [{"params": [p for p in ctx.model.parameters() if p.requires_grad]}]


class FrozenBase(Routed):
    """LoRA and adapters: freeze the backbone, wrap the modules a subclass picks with branches,
    one set per task in the task setting (one shared set otherwise)."""

    name = ""

    def __init__(self, train_head: bool) -> None:
        super().__init__()
        self.train_head = train_head
        self.branches: list[Branch] = []

    def wraps(self, ctx: TrainContext, head: nn.Module) -> list[tuple[str, Branched]]:
        """(module name, wrapper) for every module that gets a branch."""
        raise NotImplementedError

    def setup(self, ctx: TrainContext) -> None:
        model = ctx.model
        head = split_head(model)[1]
        model.requires_grad_(False)
        head.requires_grad_(self.train_head)
        self.routing.per_task = ctx.setting.name == "task"
        wraps = self.wraps(ctx, head)
        # Innermost first, so that wrapping a module never moves one still to be wrapped.
        for name, wrapper in sorted(wraps, key=lambda w: w[0].count("."), reverse=True):
            model.set_submodule(name, wrapper.to(ctx.device))
        self.branches = [w.branch for _, w in sorted(wraps, key=lambda w: w[0])]
        for module in model.modules():
            if has_running_stats(module):
                hold_in_eval(module)
        if not self.routing.per_task:
            self.add_sets(ctx, 0)
        ctx.log[self.name] = {"modules": sorted(n for n, _ in wraps),
                              "params_per_set": sum(b.set_size() for b in self.branches)}

    def add_sets(self, ctx: TrainContext, task_index: int) -> None:
        """Sets up to task `task_index`'s (set k serves task k), earlier ones frozen."""
        for branch in self.branches:
            branch.sets.requires_grad_(False)
            while len(branch.sets) <= task_index:
                branch.add_set(ctx.generator, ctx.device)
        self.routing.default = task_index

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        if self.routing.per_task:
            self.add_sets(ctx, ctx.task_index)

    def state_bytes(self) -> int:
        """The adapter parameters, every set."""
        return sum(n_bytes(b.parameters()) for b in self.branches)


def _matching(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(option: str, patterns: tuple[str, ...]) -> None:
    if any(not p for p in patterns):
        raise ValueError(f"{option} must be module-name globs, got {patterns!r}")


@register_strategy("lora", family="parameter-efficient", reference="Hu et al. 2021")
class LoRA(FrozenBase):
    """Low-rank adaptation: a frozen layer W plus a trainable low-rank update (alpha/r) B A.

    Every linear layer (``nn.Linear``, or the ``Conv1D`` of transformers' GPT-2: its attention
    and MLP projections) and ``nn.Conv2d`` whose name (as in ``model.named_modules()``) matches
    a glob in `targets` computes W x + (alpha/rank) B A dropout(x); the head is never adapted.
    A (rank x in) is Kaiming-uniform and B (out x rank) zero, so the model is unchanged when the
    adapters are added; a Linear adapter has rank * (in + out) parameters. For a convolution, A is
    a convolution with the layer's kernel, stride, padding and dilation into `rank` channels and
    B a 1x1 convolution back: rank * (in * kh * kw + out) parameters. Grouped convolutions are
    not supported (an error names them).

    Task setting: one adapter set per task, each sample through its own task's set (see the
    module docstring), so earlier tasks' outputs never change. Class and domain settings: no
    task label at test, so one set is trained across all tasks; forgetting is limited by its rank
    and the frozen base. (Merging each task's set into W, as LoRA does at deployment, would leave
    the base no longer frozen and earlier tasks no better protected, so sets are never merged.)

    `rank` trades capacity against parameters; `alpha` scales the update (alpha/rank, so a
    larger alpha is a larger effective step); `dropout` drops adapter inputs (drawn from the
    run's generator). `train_head` trains the head in full, as PEFT does for a new classifier
    (peft's ``modules_to_save``): the rows of a new task's classes start random and nothing
    low-rank could fix that; in the task setting a task's rows only get gradients from its own
    samples (the logits are masked per task), so this forgets nothing, while in the class
    setting the shared head is where this strategy forgets.
    """

    name = "lora"

    def __init__(self, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: tuple[str, ...] = ("*",), train_head: bool = True) -> None:
        super().__init__(train_head)
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_patterns("targets", targets)
        self.rank, self.alpha, self.dropout, self.targets = rank, alpha, dropout, targets

    def _branch(self, name: str, layer: nn.Module) -> Branch:
        options = {"width": self.rank, "scale": self.alpha / self.rank, "dropout": self.dropout}
        shape = linear_shape(layer)
        if shape is not None:
            return Branch(self.routing, in_features=shape[0], out_features=shape[1], conv=False,
                          **options)
        assert isinstance(layer, nn.Conv2d)
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise CfbenchError(f"lora cannot adapt convolution '{name}' (groups={layer.groups}, "
                               f"padding_mode={layer.padding_mode}); leave it out of targets")
        return Branch(self.routing, in_features=layer.in_channels,
                      out_features=layer.out_channels, conv=True, kernel=layer.kernel_size,
                      stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                      **options)

    def wraps(self, ctx: TrainContext, head: nn.Module) -> list[tuple[str, Branched]]:
        if self.dropout:
            seed = int(torch.randint(2**62, (), generator=ctx.generator))
            self.routing.generator = torch.Generator(ctx.device).manual_seed(seed)
        layers = [(n, m) for n, m in ctx.model.named_modules()
                  if (linear_shape(m) is not None or isinstance(m, nn.Conv2d)) and m is not head
                  and _matching(n, self.targets)]
        if not layers:
            raise CfbenchError(f"lora: no Linear or Conv2d layer besides the head matches "
                               f"targets {','.join(self.targets)}")
        return [(n, Branched(m, self._branch(n, m), on_input=True)) for n, m in layers]


def residual_blocks() -> tuple[type[nn.Module], ...]:
    """The residual block classes of the ResNets here (cfbench's and torchvision's)."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock
    from torchvision.models.resnet import Bottleneck

    return BasicBlock, TorchvisionBlock, Bottleneck


@register_strategy("adapter", family="parameter-efficient", reference="Houlsby et al. 2019")
class Adapter(FrozenBase):
    """Bottleneck adapters: x -> x + up(relu(down(x))) inserted after chosen modules of a frozen
    backbone.

    Where: after every module whose name matches a glob in `after`; by default (empty) after
    every residual block of a ResNet (cfbench's and torchvision's BasicBlock and Bottleneck); in
    a model without residual blocks, after every ``nn.ReLU`` (the hidden layers of ``mlp:...``);
    in a model with neither, once after its body, on the features the head reads (textgenrnn's
    attention-pooled features). The head and the model itself are never matched. On a d-feature
    output (the last dimension) `down` is Linear(d, bottleneck) and `up` Linear(bottleneck, d);
    on a feature map (N x C x H x W) both are 1x1 convolutions over the C channels. One adapter
    has 2 * d * bottleneck + bottleneck + d parameters. `down` is Kaiming-uniform, `up` and both
    biases start at zero: Houlsby et al.'s near-identity initialisation taken to its limit, so
    adding adapters leaves the model's function exactly unchanged.

    Task setting: one adapter set per task, routed per sample by task; other settings: one set
    trained across tasks (as for ``lora``). `bottleneck` trades capacity against parameters:
    Houlsby et al. used 8-256 for 768- to 1024-wide layers; the default 32 is 8% of a 400-wide
    layer (26,032 parameters per adapter there) and narrower than every stage of a reduced
    ResNet but the first (20 channels). `train_head` as for ``lora``.
    """

    name = "adapter"

    def __init__(self, *, bottleneck: int = 32, after: tuple[str, ...] = (),
                 train_head: bool = True) -> None:
        super().__init__(train_head)
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive integer, got {bottleneck}")
        _check_patterns("after", after)
        self.bottleneck, self.after = bottleneck, after

    def _places(self, model: nn.Module, head: nn.Module) -> list[tuple[str, nn.Module]]:
        named = [(n, m) for n, m in model.named_modules() if n and m is not head]
        if self.after:
            return [(n, m) for n, m in named if _matching(n, self.after)]
        blocks = [(n, m) for n, m in named if isinstance(m, residual_blocks())]
        relus = [(n, m) for n, m in named if isinstance(m, nn.ReLU)]
        body = split_head(model)[0]
        return blocks or relus or [(n, m) for n, m in named if m is body]

    def wraps(self, ctx: TrainContext, head: nn.Module) -> list[tuple[str, Branched]]:
        places = self._places(ctx.model, head)
        if not places:
            what = f"matches after={','.join(self.after)}" if self.after else (
                "is a residual block, an nn.ReLU or the body before the head")
            raise CfbenchError(f"adapter: no module of the model besides the head {what}")
        shapes = output_shapes(ctx, [m for _, m in places])
        wraps = []
        for (name, module), shape in zip(places, shapes, strict=True):
            if len(shape) not in (2, 3, 4):
                raise CfbenchError(f"adapter: cannot follow '{name}', whose output has shape "
                                   f"{tuple(shape)} (need N x d or N x C x H x W)")
            conv = len(shape) == 4
            features = shape[1] if conv else shape[-1]
            branch = Branch(self.routing, in_features=features, width=self.bottleneck,
                            out_features=features, conv=conv, bias=True, relu=True)
            wraps.append((name, Branched(module, branch, on_input=False)))
        return wraps


def output_shapes(ctx: TrainContext, modules: list[nn.Module]) -> list[torch.Size]:
    """Each module's output shape on two training inputs (eval mode, no gradient)."""
    shapes: dict[int, torch.Size] = {}

    def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        shapes.setdefault(id(module), output.shape)

    hooks = [m.register_forward_hook(record) for m in modules]
    was_training = ctx.model.training
    try:
        ctx.model.eval()
        with torch.no_grad():
            ctx.model(ctx.scenario.prepare(ctx.scenario.tasks[0].x_train[:2]))
    finally:
        ctx.model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [shapes[id(m)] for m in modules]


def mlp_layers(model: nn.Module) -> int:
    """The number of Linear layers of an ``mlp:...`` backbone (Flatten, then Linear and ReLU
    alternating, a Linear last); any other model is a CfbenchError."""
    parts = list(model) if isinstance(model, nn.Sequential) else []
    if (len(parts) < 2 or len(parts) % 2 or not isinstance(parts[0], nn.Flatten)
            or not all(isinstance(m, nn.Linear) for m in parts[1::2])
            or not all(isinstance(m, nn.ReLU) for m in parts[2::2])):
        raise CfbenchError(f"progressive supports mlp:... backbones only (Flatten, then Linear "
                           f"and ReLU layers); got {type(model).__name__}")
    return len(parts) // 2


class ProgressiveNet(nn.Module):
    """Columns of one MLP architecture joined by lateral connections (Rusu et al. 2016).

    Column k's layer i computes W_i^k h_{i-1}^k + b_i^k + U_i^k [h_{i-1}^0, ..., h_{i-1}^{k-1}]
    followed by the ReLU (none after the output layer), for every layer i >= 2: U_i^k is one
    bias-free linear map of the earlier columns' concatenated layer i-1 activations (after their
    ReLU), i.e. the sum of one lateral per earlier column. Layer 1 has no lateral (every column
    sees the same input). A sample of task t is answered by column t (by the newest column for a
    task that has none yet); without routed ids, by column `routing.default`.
    """

    def __init__(self, first: nn.Sequential, routing: Routing) -> None:
        super().__init__()
        self.n_layers = mlp_layers(first)
        self.columns = nn.ModuleList([first])
        self.laterals = nn.ModuleList()
        self.routing = routing

    def add_column(self, generator: torch.Generator, device: torch.device) -> None:
        """A new trainable column, freshly initialised from `generator`, with its laterals."""
        column = copy.deepcopy(self.columns[0]).requires_grad_(True)
        k = len(self.columns)
        laterals = nn.ModuleList()
        with torch.no_grad():
            for i in range(self.n_layers):
                layer = column[2 * i + 1]
                layer.weight.copy_(kaiming_uniform(layer.weight.shape, layer.in_features,
                                                   generator, device))
                layer.bias.copy_(kaiming_uniform(layer.bias.shape, layer.in_features, generator,
                                                 device))
                if i:
                    lateral = skip_init(nn.Linear, k * layer.in_features, layer.out_features,
                                        bias=False, device=device)  # no global RNG draw
                    lateral.weight.copy_(kaiming_uniform(lateral.weight.shape,
                                                         lateral.in_features, generator, device))
                    laterals.append(lateral)
        self.columns.append(column)
        self.laterals.append(laterals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.routing.task_ids(x.shape[0])
        last = len(self.columns) - 1
        if ids is None:
            last = min(self.routing.default, last)
        columns = self.columns[:last + 1]
        h = [x.flatten(1)] * (last + 1)
        for i in range(self.n_layers):
            z = [column[2 * i + 1](h[k]) for k, column in enumerate(columns)]
            if i:
                for k in range(1, last + 1):
                    z[k] = z[k] + self.laterals[k - 1][i - 1](torch.cat(h[:k], dim=1))
            h = z if i == self.n_layers - 1 else [torch.relu(v) for v in z]
        if ids is None:
            return h[last]
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.stack(h)[ids.clamp(max=last), rows]


@register_strategy("progressive", family="architectural", reference="Rusu et al. 2016",
                   settings=("task",))
class Progressive(Routed):
    """Progressive networks: a new column per task, earlier columns frozen, lateral connections
    from every earlier column (see `ProgressiveNet` for the exact form).

    Column 0 is the backbone itself (so in a transfer scenario it is the pretrained model);
    each later column is a copy of its architecture freshly initialised from the run's
    generator. Replaces ``ctx.model`` with the network in ``setup`` and grows it in
    ``before_task``; only the new column and its laterals train. A sample is answered by its
    task's column, which depends on frozen columns only, so earlier tasks' accuracies never
    change (BWT is exactly 0) -- at the price of parameters growing quadratically with the
    number of tasks (column k has laterals from k columns). Task setting only (the task label
    picks the column); ``mlp:...`` backbones only (other models: an error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.net: ProgressiveNet | None = None

    def setup(self, ctx: TrainContext) -> None:
        self.net = ProgressiveNet(ctx.model, self.routing)
        ctx.model = self.net

    def before_task(self, ctx: TrainContext, task: Task) -> None:
        assert self.net is not None
        if ctx.task_index >= len(self.net.columns):
            self.net.requires_grad_(False)
            while len(self.net.columns) <= ctx.task_index:
                self.net.add_column(ctx.generator, ctx.device)
        self.routing.default = ctx.task_index

    def state_bytes(self) -> int:
        """Frozen columns (all but the newest) and every lateral connection."""
        if self.net is None:
            return 0
        frozen = [p for column in self.net.columns[:-1] for p in column.parameters()]
        return n_bytes(frozen) + n_bytes(self.net.laterals.parameters())
