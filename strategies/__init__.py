"""Built-in strategies, one module per family; importing this package registers them all."""

from cfbench.strategies import (
    baselines,
    distillation,
    finetuning,
    generative,
    icarl,
    regularization,
    replay,
)

__all__ = ["baselines", "distillation", "finetuning", "generative", "icarl", "regularization",
           "replay"]
