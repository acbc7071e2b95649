"""Fuzzing every reader of files a user may be handed (issue 18): run records, sweep files,
IDX, CIFAR pickles and MedMNIST npz archives, fed random bytes and mutations of valid files.
Each must give a valid result or a one-line CfbenchError, never another exception; a record it
accepts must tabulate in every format; a file name made from record text must stay in its
folder. Derandomised and bounded, so CI runs the same few hundred inputs in seconds."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import pickle
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfbench.data import cifar, medmnist, parse_idx
from cfbench.errors import CfbenchError
from cfbench.formats import FORMATS, file_stem, render
from cfbench.leaderboard import Provenance, summarize
from cfbench.records import RunRecord, parse_record
from cfbench.sweepfile import SweepFile, load_sweep
from tests.test_hostile_outputs import good_record

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=3), derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


def either(read: Callable[[], Any]) -> Any:
    """What `read` returns, or None after a one-line CfbenchError; any other exception fails."""
    try:
        return read()
    except CfbenchError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc), str(exc)
        return None


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` with a few bytes changed, cut out or inserted, most often in its first or last
    256 bytes (where headers and a zip archive's directory are)."""
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        last = max(len(out) - 1, 0)
        at = draw(st.one_of(st.integers(0, min(255, last)),
                            st.integers(max(0, last - 255), last), st.integers(0, last)))
        action = draw(st.sampled_from(["set", "cut", "insert"]))
        byte = draw(st.integers(0, 255))
        if action == "set" and out:
            out[at] = byte
        elif action == "cut":
            del out[at:at + draw(st.integers(1, 16))]
        else:
            out.insert(at, byte)
    return bytes(out)


# --- run records ---------------------------------------------------------------------------

def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) into a JSON value."""
    children = (node.items() if isinstance(node, dict)
                else enumerate(node) if isinstance(node, list) else [])
    return [prefix, *(p for k, v in children for p in paths(v, (*prefix, k)))]


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    """A valid record with one field (at any depth) replaced by a random JSON value or
    deleted; or a valid record's bytes mutated."""
    record = copy.deepcopy(good_record())
    if draw(st.booleans()):
        return draw(mutated(json.dumps(record).encode()))
    *parents, last = draw(st.sampled_from(paths(record)[1:]))
    node = record
    for key in parents:
        node = node[key]
    if draw(st.booleans()) and isinstance(node, dict):
        del node[last]
    else:
        node[last] = draw(JSON)
    return json.dumps(record).encode()


@settings(FUZZ, max_examples=25)  # a record that reads is tabulated six ways: 0.2 s
@given(st.one_of(mutated_records(), st.binary(max_size=64)))
def test_record_reader_accepts_only_records_that_tabulate(raw: bytes) -> None:
    record = either(lambda: parse_record(raw, "fuzz.json"))
    if record is not None and record.status == "ok":
        summary = summarize([record])
        for fmt in FORMATS:
            render(summary, fmt, Provenance.of([record], ["leaderboard"]))
    if record is not None:
        assert isinstance(record, RunRecord)
        parse_record(record.to_json(), "again")  # what is written reads back


@FUZZ
@given(st.lists(st.text(max_size=12), min_size=1, max_size=3))
def test_file_stems_stay_in_their_folder_and_never_collide(parts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        name = f"{file_stem(*parts)}-R.png"
        assert (out / name).resolve().parent == out.resolve()
        assert not name.startswith((".", "-")) and len(name.encode()) < 255
        (out / name).write_bytes(b"")  # a name the file system takes
        other = [*parts[:-1], parts[-1] + "/"]
        assert file_stem(*other) != file_stem(*parts)


# --- sweep files ---------------------------------------------------------------------------

SWEEP = b"""name: fuzz
scenarios:
  split-digits: {test_fraction: [0.2, 0.3]}
settings: [task, class]
strategies:
  naive:
  ewc: {lam: [1, 10.5], fisher: sampled}
  ewc+replay: {ewc: {lam: 2}, replay: {memory: 20}}
seeds: [0, 1]
scenario_seed: 3
protocol: {iterations: 2, lr: [0.01, 1e-3], batch_size: 16}
timeout: 60
resources: {cpus: 1}
tune: {seeds: [5], validation: 0.25, tasks: 2}
"""


@FUZZ
@given(st.one_of(mutated(SWEEP), st.binary(max_size=64)))
def test_sweep_checker_gives_a_sweep_or_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_bytes(raw)
        result = either(lambda: load_sweep(path))
        assert result is None or isinstance(result, SweepFile)
        assert list(Path(tmp).iterdir()) == [path]


def test_the_unmutated_sweep_is_valid(tmp_path: Path) -> None:
    (tmp_path / "sweep.yaml").write_bytes(SWEEP)
    assert load_sweep(tmp_path / "sweep.yaml").name == "fuzz"


# --- data files ----------------------------------------------------------------------------

IDX = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes() + bytes(range(24))


@FUZZ
@given(st.one_of(mutated(IDX), st.binary(max_size=40)))
def test_idx_reader_gives_the_array_its_header_describes_or_one_line(raw: bytes) -> None:
    array = either(lambda: parse_idx(raw, "fuzz-idx"))
    if array is not None:
        assert array.shape == tuple(np.frombuffer(raw[4:4 + 4 * raw[3]], ">u4"))


def cifar_batch() -> bytes:
    """A CIFAR-100 batch as the archives pickle it (protocol 2, bytes keys)."""
    content = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251,
               b"fine_labels": [3, 7], b"fine_label_names": [b"a"] * 100}
    return pickle.dumps(content, protocol=2)


@FUZZ
@given(mutated(cifar_batch()))
def test_cifar_reader_on_mutated_pickles(raw: bytes) -> None:
    layout = cifar.LAYOUTS["cifar100"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / layout.folder
        folder.mkdir()
        names = (*layout.train, *layout.test, layout.meta)
        for name in names:
            (folder / name).write_bytes(raw)  # every file the same: the first bad one answers
        md5 = dict.fromkeys(names, hashlib.md5(raw).hexdigest())
        with mock.patch.object(cifar, "expected_md5", return_value=md5):
            dataset = either(lambda: cifar.read_cifar("cifar100", Path(tmp)))
    if dataset is not None:
        assert dataset.x_train.shape[1:] == (3, 32, 32)


@functools.cache
def medmnist_npz(compressed: bool) -> bytes:
    """A tiny pathmnist.npz (RGB, 9 classes) as the medmnist package stores one."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in medmnist.SPLITS:
        arrays[f"{split}_images"] = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [8]], dtype=np.uint8)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@FUZZ
@given(st.booleans().flatmap(lambda compressed: mutated(medmnist_npz(compressed))))
def test_medmnist_reader_on_mutated_archives(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(medmnist, "expected_md5", return_value=None):
        (Path(tmp) / "medmnist").mkdir()
        (Path(tmp) / "medmnist" / "pathmnist.npz").write_bytes(raw)
        result = either(lambda: medmnist.load_medmnist("pathmnist", Path(tmp)))
    if result is not None:
        assert result.x_train.shape[1:] == (3, 28, 28)
