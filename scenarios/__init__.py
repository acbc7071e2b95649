"""Built-in scenarios; importing this package registers them all."""

from cfbench.scenarios import digits, medical, mnist

__all__ = ["digits", "medical", "mnist"]
