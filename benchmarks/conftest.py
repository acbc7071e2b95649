"""Benchmarks share the tests' fixtures (real MNIST fetched and verified once)."""

from tests.conftest import mnist_root

__all__ = ["mnist_root"]
