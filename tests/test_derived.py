"""Derived datasets cached in the data root (cfbench.data.derived): the cache gives back exactly
what was built, is used when present, and is rebuilt when damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cfbench.data import load_idx_dataset
from cfbench.data.derived import cached_arrays, entry_name
from cfbench.scenarios.mnist import permuted_mnist, rotate, rotated_mnist, rotation_angles


class Builder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                "labels": np.array([3, 1], dtype=np.int64)}


def test_a_second_build_maps_the_cache_instead_of_building(tmp_path):
    build = Builder()
    first = cached_arrays(tmp_path, "toy", {"seed": 0}, build)
    second = cached_arrays(tmp_path, "toy", {"seed": 0}, build)
    assert build.calls == 1
    for key in ("images", "labels"):
        assert torch.equal(first[key], second[key]) and first[key].dtype == second[key].dtype
    second["images"] += 1  # copy-on-write: the tensor is writable, the file is not changed
    assert torch.equal(cached_arrays(tmp_path, "toy", {"seed": 0}, build)["images"],
                       first["images"]) and build.calls == 1


def test_what_an_entry_depends_on_names_it(tmp_path):
    build = Builder()
    cached_arrays(tmp_path, "toy", {"seed": 0}, build)
    cached_arrays(tmp_path, "toy", {"seed": 1}, build)
    assert build.calls == 2
    assert entry_name("toy", {"seed": 0}) != entry_name("toy", {"seed": 1})


def test_a_damaged_entry_is_rebuilt(tmp_path):
    build = Builder()
    cached_arrays(tmp_path, "toy", {"seed": 0}, build)
    entry = tmp_path / "derived" / entry_name("toy", {"seed": 0})
    (entry / "images.npy").write_bytes(b"\x93NUMPY truncated")
    again = cached_arrays(tmp_path, "toy", {"seed": 0}, build)
    assert build.calls == 2 and again["images"].shape == (2, 3, 4)
    assert cached_arrays(tmp_path, "toy", {"seed": 0}, build)["labels"].tolist() == [3, 1]
    assert build.calls == 2  # the rebuilt entry is whole again


def test_a_data_root_that_cannot_hold_the_cache_works_uncached(tmp_path):
    (tmp_path / "derived").write_text("a file where the cache directory would go")
    build = Builder()
    assert cached_arrays(tmp_path, "toy", {}, build)["labels"].tolist() == [3, 1]
    cached_arrays(tmp_path, "toy", {}, build)
    assert build.calls == 2 and (tmp_path / "derived").is_file()


@pytest.fixture
def fresh_root(mnist_root: Path, tmp_path: Path) -> Path:
    """A data root with the verified MNIST files and no cache yet."""
    (tmp_path / "mnist").symlink_to(mnist_root / "mnist")
    return tmp_path


def test_rotated_and_permuted_mnist_are_the_same_from_the_cache(fresh_root):
    for build in (rotated_mnist, permuted_mnist):
        built, mapped = (build(data_root=fresh_root, seed=5, tasks=2) for _ in range(2))
        assert [t.name for t in built.tasks] == [t.name for t in mapped.tasks]
        for a, b in zip(built.tasks, mapped.tasks, strict=True):
            for field in ("x_train", "y_train", "x_test", "y_test"):
                assert torch.equal(getattr(a, field), getattr(b, field))
    assert len(list((fresh_root / "derived").iterdir())) == 2
    # and the cached rotation is the rotation itself
    angle = rotation_angles(2, 5)[1]
    rotated = rotated_mnist(data_root=fresh_root, seed=5, tasks=2).tasks[1]
    digits = torch.from_numpy(load_idx_dataset("mnist", fresh_root).x_test[:64]).unsqueeze(1)
    assert torch.equal(rotated.x_test[:64], rotate(digits, angle))
