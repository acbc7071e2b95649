"""Built-in scenarios; importing this package registers them all."""

from cfbench.scenarios import cifar, digits, medical, mnist

__all__ = ["cifar", "digits", "medical", "mnist"]
