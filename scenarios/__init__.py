"""Built-in scenarios; importing this package registers them all."""

from cfbench.scenarios import digits, mnist

__all__ = ["digits", "mnist"]
