"""MedMNIST's npz files, read as the ``medmnist`` package stores them, and verified.

A dataset lives in ``<data root>/medmnist/<flag>.npz`` (28x28 images) or
``<flag>_<size>.npz`` (MedMNIST+ sizes 64, 128, 224): six arrays, ``{train,val,test}_images``
(uint8, N x S x S grey or N x S x S x 3 RGB) and ``{train,val,test}_labels`` (integers, N x 1).

Only the 2D single-label datasets are read (multi-class, binary, and RetinaMNIST's five
ordinal grades read as five classes); the multi-label ChestMNIST and the 3D volumes are refused
with the reason. Each file is checked against the MD5 in ``medmnist.INFO`` when the
``medmnist`` package is installed; without it the file is checked structurally only (array
names, dtypes, shapes, label range), which catches truncation and mix-ups but not a subtly
altered file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfbench.data import refuse_directory
from cfbench.errors import CfbenchError


@dataclass(frozen=True)
class Flag:
    """What cfbench knows of one 2D single-label MedMNIST dataset."""

    python_class: str
    """Its class in the medmnist package (used to fetch it)."""
    n_classes: int
    channels: int


FLAGS: dict[str, Flag] = {
    "pathmnist": Flag("PathMNIST", 9, 3),
    "dermamnist": Flag("DermaMNIST", 7, 3),
    "octmnist": Flag("OCTMNIST", 4, 1),
    "pneumoniamnist": Flag("PneumoniaMNIST", 2, 1),
    "retinamnist": Flag("RetinaMNIST", 5, 3),
    "breastmnist": Flag("BreastMNIST", 2, 1),
    "bloodmnist": Flag("BloodMNIST", 8, 3),
    "tissuemnist": Flag("TissueMNIST", 8, 1),
    "organamnist": Flag("OrganAMNIST", 11, 1),
    "organcmnist": Flag("OrganCMNIST", 11, 1),
    "organsmnist": Flag("OrganSMNIST", 11, 1),
}
MULTI_LABEL = ("chestmnist",)
VOLUMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
           "vesselmnist3d", "synapsemnist3d")
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
ARRAYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
ZENODO = "https://zenodo.org/records/10519652"
DEFAULT_FLAGS = ("pathmnist", "dermamnist", "bloodmnist", "organamnist")


@dataclass(frozen=True)
class MedMnist:
    """One dataset's three splits: images uint8 N x C x S x S (channels first), labels int64."""

    flag: str
    n_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def check_flag(flag: str) -> Flag:
    """The dataset `flag` names, or ValueError saying why cfbench cannot use it."""
    if flag in FLAGS:
        return FLAGS[flag]
    readable = ", ".join(FLAGS)
    if flag in MULTI_LABEL:
        raise ValueError(f"MedMNIST '{flag}' is multi-label (several findings per image), but a "
                         f"task needs one label per image; use one of {readable}")
    if flag in VOLUMES:
        raise ValueError(f"MedMNIST '{flag}' holds 3D volumes, not images; use one of "
                         f"{readable}")
    raise ValueError(f"unknown MedMNIST dataset '{flag}'; use one of {readable}")


def check_size(size: int) -> None:
    if size not in SIZES:
        raise ValueError(f"MedMNIST images come in sizes {', '.join(map(str, SIZES))}, not "
                         f"{size}")


def file_name(flag: str, size: int) -> str:
    """The medmnist package's name for a file: no suffix for 28x28, ``_<size>`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag: str, size: int) -> str | None:
    """The MD5 the medmnist package publishes for this file, or None without the package (or
    with one too old to list this size)."""
    try:
        import medmnist
    except ImportError:
        return None
    return medmnist.INFO.get(flag, {}).get("MD5" if size == 28 else f"MD5_{size}")


def _how_to_get(flag: str, size: int, root: Path) -> str:
    size_arg = "" if size == 28 else f" --size {size}"
    return (f"run `pip install medmnist` and `cfbench data fetch medmnist --data-root "
            f"{root}{size_arg}`, or download {file_name(flag, size)} from {ZENODO} into "
            f"{root / 'medmnist'}/")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_medmnist(flag: str, root: Path, size: int = 28, rgb: bool = True) -> MedMnist:
    """Read and verify ``root/medmnist/<flag>[_size].npz``; a clear CfbenchError if missing or
    bad. Images come out channels first; `rgb` repeats a grey channel three times (what an
    ImageNet backbone takes). Labels become a flat int64 vector."""
    info = check_flag(flag)
    check_size(size)
    path = root / "medmnist" / file_name(flag, size)
    if not path.is_file():
        refuse_directory(path, _how_to_get(flag, size, root))
        raise CfbenchError(f"MedMNIST file {path} not found; {_how_to_get(flag, size, root)}")
    fix = f"delete it and {_how_to_get(flag, size, root)}"
    expected = expected_md5(flag, size)
    if expected is not None:
        digest = _md5(path)
        if digest != expected:
            raise CfbenchError(f"checksum mismatch for {path}: md5 {digest}, expected "
                               f"{expected} (medmnist.INFO); {fix}")
    arrays = _read_npz(path, fix)
    splits = {split: _check_split(arrays, split, info, size, str(path), fix)
              for split in SPLITS}
    if rgb and info.channels == 1:
        splits = {s: (np.repeat(x, 3, axis=1), y) for s, (x, y) in splits.items()}
    return MedMnist(flag, info.n_classes, *splits["train"], *splits["val"], *splits["test"])


def _read_npz(path: Path, fix: str) -> dict[str, np.ndarray]:
    """The six arrays of an npz archive; a CfbenchError if it is no such archive."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CfbenchError(f"{path} is a single .npy array, not an npz archive; {fix}")
        with npz:
            missing = [name for name in ARRAYS if name not in npz.files]
            if missing:
                raise CfbenchError(f"{path} is not a MedMNIST file: it lacks the arrays "
                                   f"{', '.join(missing)}; {fix}")
            return {name: npz[name] for name in ARRAYS}
    except CfbenchError:
        raise
    except Exception as exc:  # any failure to decode means the same: zip, zlib, an encrypted
        # member, numpy's header parser (even tokenize's errors), a header asking for terabytes
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CfbenchError(f"{path} is not a readable npz file ({reason}); {fix}") from None


def _check_split(arrays: dict[str, np.ndarray], split: str, info: Flag, size: int,
                 source: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N x C x S x S) and labels (N,), after checking what was stored."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    want = (size, size) if info.channels == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != want or len(images) == 0:
        shape = ", ".join(map(str, want))
        raise CfbenchError(f"{source}: {split}_images is {images.dtype} of shape "
                           f"{images.shape}, expected uint8 of shape (N, {shape}) with N > 0; "
                           f"{fix}")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images), 1):
        raise CfbenchError(f"{source}: {split}_labels is {labels.dtype} of shape {labels.shape},"
                           f" expected integers of shape ({len(images)}, 1) (one label per "
                           f"image); {fix}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= info.n_classes:
        raise CfbenchError(f"{source}: {split}_labels range from {low} to {high}, outside the "
                           f"{info.n_classes} classes 0..{info.n_classes - 1}; {fix}")
    x = images[:, None] if info.channels == 1 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), labels[:, 0].astype(np.int64)


def fetch_medmnist(root: Path, flags: Sequence[str] = DEFAULT_FLAGS, size: int = 28) -> Path:
    """Put verified ``<flag>[_size].npz`` files into ``root/medmnist`` with the medmnist
    package's own downloader (which checks its MD5); files already there and valid are kept.
    Returns the directory."""
    for flag in flags:
        check_flag(flag)
    check_size(size)
    directory = root / "medmnist"
    names = ", ".join(file_name(flag, size) for flag in flags)
    try:
        import medmnist
    except ImportError:
        raise CfbenchError(f"cannot fetch {names}: the medmnist package is not installed; run "
                           f"`pip install medmnist`, or download them from {ZENODO} into "
                           f"{directory}/") from None
    directory.mkdir(parents=True, exist_ok=True)
    for flag in flags:
        try:
            getattr(medmnist, FLAGS[flag].python_class)(split="train", download=True,
                                                        root=str(directory), size=size)
        except Exception as exc:  # the package reports every failure its own way
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise CfbenchError(f"could not fetch {file_name(flag, size)} with the medmnist "
                               f"package ({reason}); download it from {ZENODO} into "
                               f"{directory}/") from None
        load_medmnist(flag, root, size)
    return directory
