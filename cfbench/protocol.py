"""The training protocol: the budget, optimiser and the literature's protocol details every
strategy gets in a scenario; `protocol_value` reads a field from text (``--protocol`` and sweep
files alike), and `PER_SEED` names the scenario seed that follows each run's training seed.

Apart from `cfbench.scenario` (which re-exports it) and free of torch, so that reading run records
and tabulating them (`cfbench leaderboard`, `show`) never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from cfbench.errors import CfbenchError
from cfbench.registry import SETTINGS, HyperParam

INITS = ("default", "xavier", "trunc-normal")
"""The weight initialisations `Protocol.init` names (``cfbench.models.initialise``)."""

PER_SEED = "seed"
"""A scenario seed (``--scenario-seed``, a sweep file's ``scenario_seed``) that is each run's
training seed: every seed gets its own task sequence (class order, permutations), as in van de
Ven et al.'s code, where one seed draws both. `scenario_seed_of` resolves it."""


def scenario_seed_of(scenario_seed: int | str, seed: int) -> int:
    """The scenario seed a run with training seed `seed` uses."""
    return seed if scenario_seed == PER_SEED else int(scenario_seed)


@dataclass(frozen=True)
class Protocol:
    """The training budget and optimiser every strategy gets in a scenario. Recorded in full."""

    model: str = "mlp:400,400"
    epochs: float | None = 1.0
    iterations: int | None = None
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    eval_batch_size: int = 4096
    class_scope: str = "seen"
    reset_optimizer: bool = True
    """A fresh optimizer for each task (True), or one whose state (Adam's moments) carries over
    from task to task, as in Hsu et al. 2018's code (False)."""
    precision: str = "fp32"
    """"bf16": forward passes (training and evaluation) under bfloat16 autocast; weights,
    gradients, optimizer state and strategy state stay float32."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (in place, so parameter names, state dicts and
    copies are unchanged). Compilation happens in the first steps and is charged to training."""
    fused_optimizer: bool = False
    """The optimizer's fused kernel (one pass over all parameters per step): about 20% faster
    training of the default MLP on the CPU; it rounds differently from the default kernel, so
    the numbers differ from an unfused run in the last bits."""
    normalize: bool = True
    """Image inputs normalised by the scenario's mean and std (True), or left as pixels in
    [0, 1] (False), as GEM's, van de Ven et al.'s and Mammoth's MNIST code feed them."""
    init: str = "default"
    """How the backbone's Linear and Conv2d layers are initialised: PyTorch's default,
    "xavier" (Xavier-uniform weights, zero biases: Mammoth's MLP; Keras' default in Zenke et
    al.'s code) or "trunc-normal" (weights N(0, 0.1^2) truncated at two standard deviations,
    biases 0.1: the TensorFlow EWC code of ariseff/overcoming-catastrophic)."""
    train_per_task: int | None = None
    """Train on at most this many samples of each task, drawn by the scenario seed (GEM's
    ``--samples_per_task``: 1000 on MNIST); None: all of them. Test splits are untouched."""
    also_evaluate: tuple[str, ...] = ()
    """Further settings the trained model is scored in at every evaluation, without retraining
    (a class-setting model scored with task masks too, as papers report both): one matrix
    shaped like R per setting, ``RunRecord.matrices["R@task"]``. Only between the task and
    class settings, which share their output units."""

    LATER: ClassVar[tuple[str, ...]] = ("precision", "compile", "fused_optimizer", "normalize",
                                        "init", "train_per_task", "also_evaluate")
    """Fields added after the first release: recorded only away from their defaults."""

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.iterations is None):
            raise CfbenchError("set exactly one of --epochs or --iterations")
        for flag, value in (("--epochs", self.epochs), ("--lr", self.lr)):
            if value is not None and not value > 0:
                raise CfbenchError(f"{flag} must be positive, got {value}")
            if value is not None and not math.isfinite(value):  # would never end, or diverge
                raise CfbenchError(f"{flag} must be finite, got {value}")
        if self.iterations is not None and self.iterations <= 0:
            raise CfbenchError(f"--iterations must be positive, got {self.iterations}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise CfbenchError("--batch-size must be a positive integer")
        if self.optimizer not in ("sgd", "adam"):
            raise CfbenchError(f"unknown optimizer '{self.optimizer}'; use sgd or adam")
        if self.class_scope not in ("seen", "all"):
            raise CfbenchError(f"class_scope must be 'seen' or 'all', got {self.class_scope!r}")
        if self.precision not in ("fp32", "bf16"):
            raise CfbenchError(f"unknown precision '{self.precision}'; use fp32 or bf16")
        if self.init not in INITS:
            raise CfbenchError(f"unknown init '{self.init}'; use {', '.join(INITS)}")
        if self.train_per_task is not None and self.train_per_task < 1:
            raise CfbenchError(f"train_per_task must be a positive number of samples or none, "
                               f"got {self.train_per_task}")
        also = tuple(self.also_evaluate)  # a record's JSON holds a list
        object.__setattr__(self, "also_evaluate", also)
        if not set(also) <= set(SETTINGS) or len(set(also)) != len(also):
            raise CfbenchError(f"also_evaluate must name distinct settings among "
                               f"{', '.join(SETTINGS)}, got {', '.join(map(str, also))}")

    def to_dict(self) -> dict[str, Any]:
        """The protocol as recorded. Fields added after the first release are left out at
        their defaults, so the ids of runs recorded before they existed stay valid."""
        d = dataclasses.asdict(self)
        for name in self.LATER:
            if d[name] == getattr(Protocol, name):
                del d[name]
        return d

    def steps(self, n_train: int) -> int:
        """Optimizer steps for a task with `n_train` training samples (last batch may be short);
        none without samples (offline joint training before its last task)."""
        if n_train == 0:
            return 0
        if self.iterations is not None:
            return self.iterations
        return max(1, math.ceil(self.epochs * n_train / self.batch_size - 1e-9))


def protocol_value(key: str, value: Any) -> Any:
    """`value` (text from ``--protocol KEY=VALUE``, or a sweep file's YAML value) as protocol
    field `key`'s type, checked as the field alone would be; a one-line CfbenchError naming the
    field otherwise. The one reading of protocol values for the command line and sweep files."""
    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    if key not in fields:
        raise CfbenchError(f"unknown protocol field '{key}'; valid: {', '.join(fields)}")
    param = HyperParam(key, typing.get_type_hints(Protocol)[key], fields[key].default)
    try:
        coerced = param.coerce(value, "the protocol")
    except CfbenchError:
        raise CfbenchError(f"expected {param.type_name}, got {value!r}") from None
    other = {"epochs": "iterations", "iterations": "epochs"}.get(key)
    # A budget in one unit replaces the other, so the value is checked against its absence.
    dataclasses.replace(Protocol(), **{key: coerced},
                        **({other: None} if other and coerced is not None else {}))
    return coerced
