"""What strategies read from a model besides its masked logits: taps on a forward pass, and
frozen copies (a teacher taken before a task).

Both live in the core rather than beside one strategy because several mechanisms share them:
distillation taps features and snapshots a teacher, DER taps the full output to store it,
iCaRL snapshots a teacher. A strategy that needs one imports it from here, never from another
strategy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from cfbench.errors import CfbenchError
from cfbench.strategy import Batch, routed_by


def frozen_copy(model: nn.Module) -> nn.Module:
    """A snapshot of `model` with its own detached tensors: eval mode, no gradients, no hooks.

    Forward hooks stay behind: a copied hook would keep writing into whatever the original's
    hook writes into (another strategy's tap), and copying a bound-method hook would copy its
    owner. Pre-seeding deepcopy's memo with empty dicts leaves them out without touching them.
    """
    memo = {id(hooks): type(hooks)() for module in model.modules()
            for name, hooks in vars(module).items()
            if name.startswith("_forward") and "hooks" in name}
    teacher = copy.deepcopy(model, memo)
    teacher.requires_grad_(False)
    return teacher.eval()


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.element_size() * t.numel()
               for t in (*module.parameters(), *module.buffers()))


class Tap:
    """The outputs (or inputs) of chosen submodules in a model's latest forward pass.

    The training step's own forward fills it, so reading costs nothing; `read` runs the model
    again when that forward was on another input (a composed strategy ran one since), or ran
    without gradient where the reader needs one (a composed strategy's no-grad pass).
    `points` maps a name to (module, True to take its input / False to take its output).
    """

    def __init__(self, model: nn.Module, points: Mapping[str, tuple[nn.Module, bool]]) -> None:
        self.model = model
        self.values: dict[str, torch.Tensor] = {}
        self._source: torch.Tensor | None = None
        self._with_grad = False
        self._names = tuple(points)
        self._aside = False

        def start(module: nn.Module, args: tuple) -> None:
            if not self._aside:
                self.values.clear()
                self._source = args[0] if args else None
                self._with_grad = torch.is_grad_enabled()

        def keep(name: str, take_input: bool):
            def store(value: torch.Tensor) -> None:
                if not self._aside:
                    self.values[name] = value
            if take_input:
                return lambda module, args: store(args[0])
            return lambda module, args, out: store(out)

        self._handles = [model.register_forward_pre_hook(start)]
        for name, (module, take_input) in points.items():
            register = module.register_forward_pre_hook if take_input \
                else module.register_forward_hook
            self._handles.append(register(keep(name, take_input)))

    def read(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The tapped tensors of the model applied to `batch` (reusing the last forward if it
        was on the batch's inputs)."""
        if self._source is not batch.x or (torch.is_grad_enabled() and not self._with_grad):
            with routed_by(batch.task):
                self.model(batch.x)
        missing = [n for n in self._names if n not in self.values]
        if missing:
            raise CfbenchError(f"layer(s) {', '.join(missing)} took no part in the forward pass; "
                               "choose modules the model calls")
        return self.values

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Apply the model to `batch` and return the tapped tensors."""
        with routed_by(batch.task):
            self.model(batch.x)
        return self.read(batch)

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Forward passes inside leave the tapped values alone (a strategy's own pass on other
        inputs, so that the step's forward can still be read after it)."""
        self._aside = True
        try:
            yield
        finally:
            self._aside = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
