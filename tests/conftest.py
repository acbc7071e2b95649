"""Shared fixtures: real MNIST and Fashion-MNIST (fetched once, verified) and a one-call way
to run an experiment."""

from __future__ import annotations

from pathlib import Path

import pytest

from cfbench.data import data_root, fetch


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The data root with verified MNIST; fetched on first use (honours $CFBENCH_DATA)."""
    root = data_root()
    fetch("mnist", root, progress=False)
    return root


@pytest.fixture(scope="session")
def transfer_root(mnist_root: Path) -> Path:
    """The data root with verified MNIST and Fashion-MNIST (mnist-to-fashion, split-fashion-mnist);
    fetched on first use, so a fresh data root (CI's) has everything these tests read."""
    fetch("fashion-mnist", mnist_root, progress=False)
    return mnist_root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """split-digits needs no files; any root will do."""
    return tmp_path_factory.mktemp("digits-root")


@pytest.fixture(scope="session")
def fortunes_root() -> Path:
    """The data root with the verified fortunes corpus (general English); fetched on first use
    from the Debian packages, so a fresh data root works."""
    from cfbench.data.text import fetch_corpus

    root = data_root()
    fetch_corpus("fortunes", root)
    return root


@pytest.fixture(scope="session")
def textgenrnn_root(fortunes_root: Path) -> Path:
    """The data root with fortunes and the verified tier-0 weights (from PyPI's textgenrnn)."""
    from cfbench.data.textgenrnn import fetch_textgenrnn

    fetch_textgenrnn(fortunes_root)
    return fortunes_root


@pytest.fixture(scope="session")
def language_root(textgenrnn_root: Path) -> Path:
    """The data root of the lm-general-to-code scenario: fortunes, the tier-0 weights and the
    python-code corpus (the standard library's sources, from Debian)."""
    from cfbench.data.text import fetch_corpus

    fetch_corpus("python-code", textgenrnn_root)
    return textgenrnn_root
