"""Built-in scenarios; importing this package registers them all."""

from cfbench.scenarios import cifar, digits, language, medical, mnist

__all__ = ["cifar", "digits", "language", "medical", "mnist"]
