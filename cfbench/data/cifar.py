"""CIFAR-10 and CIFAR-100 in torchvision's python-pickle layout: read, verify, fetch.

The layout is the one the official archives extract to (and torchvision keeps):
``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``. Each batch is a protocol-2 pickle of a dict with
bytes keys: ``b"data"`` (uint8 N x 3072, each row the R, G and B planes of a 32x32 image, row
major) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). Every file is checked
against the MD5 torchvision lists for it before it is unpickled, and unpickling admits only the
few globals such a file refers to (numpy arrays), so a file that is not a CIFAR batch cannot run
code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfbench.data import _one_line, refuse_directory
from cfbench.errors import CfbenchError


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR dataset's files are and what their dicts hold."""

    name: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    n_classes: int
    url: str
    torchvision_class: str


LAYOUTS: dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "batches.meta", b"labels", b"label_names", 10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10"),
    "cifar100": CifarLayout(
        "cifar100", "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels",
        b"fine_label_names", 100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "CIFAR100"),
}

SIDE = 32
PIXELS = 3 * SIDE * SIDE


@dataclass(frozen=True)
class CifarDataset:
    """Images as uint8 N x 3 x 32 x 32 tensors, labels as int64, and the class names."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]


def expected_md5(name: str) -> dict[str, str]:
    """File name -> MD5 of every file of `name`, as torchvision lists them (one place, so tests
    can substitute their own files' hashes)."""
    from torchvision import datasets

    cls = getattr(datasets, LAYOUTS[name].torchvision_class)
    return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


def _layout(name: str) -> CifarLayout:
    if name not in LAYOUTS:
        raise CfbenchError(f"unknown CIFAR dataset '{name}'; use {' or '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _fix(layout: CifarLayout, root: Path) -> str:
    return (f"run `cfbench data fetch {layout.name} --data-root {root}`, or download "
            f"{layout.url} and extract it in {root}")


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch refers to: numpy arrays (under numpy 1 or 2 module names)
    and the codec Python 3 writes bytes with at protocol 2."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                          "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which no CIFAR file does")
        return super().find_class(module, name)


def _read(layout: CifarLayout, root: Path, filename: str, md5: dict[str, str]) -> dict:
    """One file's dict, verified against its MD5 before it is unpickled."""
    directory = root / layout.folder
    path = directory / filename
    if not path.is_file():
        refuse_directory(path, _fix(layout, root))
        raise CfbenchError(f"{layout.name} file '{filename}' not found in {directory}; "
                           f"{_fix(layout, root)}")
    raw = path.read_bytes()
    digest, expected = hashlib.md5(raw).hexdigest(), md5[filename]
    if digest != expected:
        raise CfbenchError(f"checksum mismatch for {path}: md5 {digest[:12]}..., expected "
                           f"{expected[:12]}...; delete it and fetch again ({_fix(layout, root)})")
    try:
        content = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any failure to decode means the same thing: not a CIFAR file
        raise CfbenchError(f"{path} is not a readable CIFAR pickle ({_one_line(exc)}); delete "
                           "it and fetch again") from None
    if not isinstance(content, dict):
        raise CfbenchError(f"{path} holds a {type(content).__name__}, not the dict of a CIFAR "
                           "file; delete it and fetch again")
    return content


def _field(content: dict, key: bytes, path: Path) -> Any:
    if key not in content:
        present = ", ".join(repr(k) for k in content) or "none"
        raise CfbenchError(f"{path} has no key {key!r} (keys: {present}); it is not a file of "
                           "this dataset: delete it and fetch again")
    return content[key]


def _batch(layout: CifarLayout, root: Path, filename: str, md5: dict[str, str]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3 x 32 x 32 uint8) and labels (int64) of one batch file, shapes checked."""
    path = root / layout.folder / filename
    content = _read(layout, root, filename, md5)
    data = _field(content, b"data", path)
    labels = _field(content, layout.label_key, path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS):
        shape = getattr(data, "shape", type(data).__name__)
        raise CfbenchError(f"{path}: b'data' must be uint8 N x {PIXELS}, got "
                           f"{getattr(data, 'dtype', '')} {shape}; delete it and fetch again")
    try:
        labels = np.asarray(labels, dtype=np.int64)
        valid = labels.shape == (len(data),) and bool(
            ((labels >= 0) & (labels < layout.n_classes)).all())
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise CfbenchError(f"{path}: {layout.label_key!r} must be {len(data)} labels in "
                           f"0..{layout.n_classes - 1}; delete it and fetch again")
    return data.reshape(-1, 3, SIDE, SIDE), labels


def _class_names(layout: CifarLayout, root: Path, md5: dict[str, str]) -> tuple[str, ...]:
    path = root / layout.folder / layout.meta
    names = _field(_read(layout, root, layout.meta, md5), layout.names_key, path)
    if not isinstance(names, list) or len(names) != layout.n_classes:
        raise CfbenchError(f"{path}: {layout.names_key!r} must list {layout.n_classes} class "
                           "names; delete it and fetch again")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar(name: str, root: Path) -> CifarDataset:
    """Read and verify CIFAR-10 or CIFAR-100 under `root`; one-line CfbenchError if a file is
    missing, altered, corrupt or not a CIFAR file. Parsed once per (name, root) per process."""
    return _load_cifar(name, root.resolve())


def read_cifar(name: str, root: Path) -> CifarDataset:
    """`load_cifar` without the cache: every file read and verified now."""
    layout = _layout(name)
    md5 = expected_md5(name)
    splits = []
    for files in (layout.train, layout.test):
        parts = [_batch(layout, root, f, md5) for f in files]
        splits += [torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in (0, 1)]
    return CifarDataset(*splits, class_names=_class_names(layout, root, md5))


_load_cifar = functools.lru_cache(maxsize=2)(read_cifar)


def fetch_cifar(name: str, root: Path) -> Path:
    """Make ``root/<folder>`` hold the verified files: download the official archive through
    ``torchvision.datasets.CIFAR10/100(download=True)`` (which checks the archive's MD5) into a
    scratch directory, verify every file, then move them into place. Returns the folder.

    Raises a one-line CfbenchError naming the manual alternative when that fails (no network).
    """
    layout = _layout(name)
    target = root / layout.folder
    try:
        load_cifar(name, root)
        return target
    except CfbenchError:
        pass
    files = (*layout.train, *layout.test, layout.meta)
    for filename in files:  # before the download: nothing could be moved over it
        refuse_directory(target / filename, f"fetch {name} again")
    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cfbench-fetch-", dir=root) as tmp:
        scratch = Path(tmp)
        try:
            getattr(datasets, layout.torchvision_class)(str(scratch), train=True,
                                                        download=True)
            read_cifar(name, scratch)  # every file verified before any is moved into place
        except Exception as exc:  # whatever failed, the fix is the same manual download
            raise CfbenchError(
                f"could not fetch {name} into {root}: torchvision.datasets."
                f"{layout.torchvision_class}(download=True) failed: {_one_line(exc)}. Download "
                f"{layout.url} by hand and extract it in {root}") from None
        target.mkdir(exist_ok=True)
        for filename in files:
            os.replace(scratch / layout.folder / filename, target / filename)
    _load_cifar.cache_clear()
    return target
