"""Built-in strategies, one module per family; importing this package registers them all."""

from cfbench.strategies import baselines, regularization

__all__ = ["baselines", "regularization"]
