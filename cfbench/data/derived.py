"""Derived datasets (rotated or permuted copies of a verified dataset) cached in the data root.

Building rotated-mnist means resampling 70,000 images per task, and every process that builds
the scenario (each worker of a sweep) would pay for it again. The first build writes the
arrays as ``.npy`` files under ``<data root>/derived/``; later builds map them into memory
(copy-on-write, so nothing can change the files, and the pages are shared between processes).
A cache entry is named by everything its arrays depend on: the scenario, its options and seed,
the checksums of the raw files it was derived from (verified when it was built) and torch's
version (resampling and random permutations may round or draw differently in another). A
missing, partial or corrupt entry is rebuilt; a data root that cannot be written to still
works, uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"


def entry_name(name: str, depends_on: Mapping[str, Any]) -> str:
    """The directory name of a cache entry: readable prefix, then a hash of what it depends on."""
    identity = json.dumps({"name": name, "torch": torch.__version__, **depends_on},
                          sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _load(directory: Path) -> dict[str, np.ndarray] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        arrays = {key: np.load(directory / f"{key}.npy", mmap_mode="c", allow_pickle=False)
                  for key in manifest}
    except (OSError, ValueError, TypeError):
        return None
    for key, (shape, dtype) in manifest.items():
        if list(arrays[key].shape) != shape or str(arrays[key].dtype) != dtype:
            return None
    return arrays


def _store(directory: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the entry into a scratch directory beside it and rename it into place, so a
    reader sees a whole entry or none (a concurrent writer's rename loses harmlessly)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        for key, array in arrays.items():
            np.save(scratch / f"{key}.npy", array, allow_pickle=False)
        manifest = {key: [list(a.shape), str(a.dtype)] for key, a in arrays.items()}
        (scratch / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cached_arrays(root: Path, name: str, depends_on: Mapping[str, Any],
                  build: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The arrays `build` returns, as tensors: mapped from the cache entry of (`name`,
    `depends_on`) when there is a good one, else built and (where the root is writable) stored."""
    directory = root / "derived" / entry_name(name, depends_on)
    arrays = _load(directory)
    if arrays is None:
        arrays = dict(build())
        with contextlib.suppress(OSError):  # a read-only data root: the scenario works, uncached
            _store(directory, arrays)
    return {key: torch.from_numpy(array) for key, array in arrays.items()}
