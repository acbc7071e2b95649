"""Built-in strategies, one module per family; importing this package registers them all."""

from cfbench.strategies import (
    adapters,
    baselines,
    distillation,
    finetuning,
    generative,
    icarl,
    protection,
    regularization,
    replay,
)

__all__ = ["adapters", "baselines", "distillation", "finetuning", "generative", "icarl",
           "protection", "regularization", "replay"]
