"""CIFAR: the pickle reader on files in the exact on-disk format, its errors, fetching, the
split-cifar scenarios end to end, and the crop-and-flip augmentation.

No real CIFAR is needed: small files are written with `pickle.dump` exactly as the official
archives hold them (protocol 2, bytes keys, uint8 N x 3072 rows of R, G and B planes, the
real file names, meta files with the class names), and the checksum lookup is pointed at
their MD5s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfbench import registry
from cfbench.augment import CropFlip
from cfbench.cli import main
from cfbench.data import cifar
from cfbench.errors import CfbenchError
from cfbench.experiment import plan_runs
from cfbench.scenario import Setting
from cfbench.scenarios.cifar import CIFAR_AUGMENTATION  # registers split-cifar10/100 on import
from cfbench.strategy import Strategy, TrainContext
from cfbench.train import evaluate, train_task
from tests.helpers import run_one

TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 5
_rng = np.random.default_rng(0)


def batch_dict(labels: np.ndarray, label_key: bytes, title: str) -> dict[bytes, object]:
    """A batch as the archives store it: random pixels for `labels`, and every key they have."""
    n = len(labels)
    content: dict[bytes, object] = {
        b"batch_label": title.encode(),
        b"data": _rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(c) for c in labels],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        content[b"coarse_labels"] = [int(c) % 20 for c in labels]  # differ from the fine ones
    return content


def balanced_labels(n_classes: int, per_class: int) -> np.ndarray:
    return _rng.permutation(np.repeat(np.arange(n_classes), per_class))


def cifar10_dicts(train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS
                  ) -> dict[str, dict[bytes, object]]:
    """Every CIFAR-10 file's dict; the real dataset has 5000 and 1000 images per class."""
    train = balanced_labels(10, train_per_class).reshape(5, -1)  # five batches, classes mixed
    dicts = {f"data_batch_{i + 1}": batch_dict(train[i], b"labels", f"training batch {i + 1} of 5")
             for i in range(5)}
    dicts["test_batch"] = batch_dict(balanced_labels(10, test_per_class), b"labels",
                                     "testing batch 1 of 1")
    dicts["batches.meta"] = {b"num_cases_per_batch": train.shape[1], b"num_vis": 3072,
                             b"label_names": [f"class{c}".encode() for c in range(10)]}
    return dicts


def cifar100_dicts() -> dict[str, dict[bytes, object]]:
    return {
        "train": batch_dict(balanced_labels(100, TRAIN_PER_CLASS), b"fine_labels", "training"),
        "test": batch_dict(balanced_labels(100, TEST_PER_CLASS), b"fine_labels", "testing"),
        "meta": {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
                 b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]},
    }


def pickled(content: object) -> bytes:
    return pickle.dumps(content, protocol=2)


DICTS = {"cifar10": cifar10_dicts(), "cifar100": cifar100_dicts()}
FILES = {name: {f: pickled(d) for f, d in dicts.items()} for name, dicts in DICTS.items()}
MD5 = {name: {f: hashlib.md5(raw).hexdigest() for f, raw in files.items()}
       for name, files in FILES.items()}
FOLDER = {name: layout.folder for name, layout in cifar.LAYOUTS.items()}
TORCHVISION_MD5 = cifar.expected_md5  # the real lookup, before the fixture replaces it


def write(root: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    directory = root / FOLDER[name]
    directory.mkdir(parents=True, exist_ok=True)
    for filename, raw in (files or FILES[name]).items():
        (directory / filename).write_bytes(raw)
    return directory


def expect(monkeypatch: pytest.MonkeyPatch, name: str, filename: str, raw: bytes) -> None:
    """Make the checksum lookup accept `raw` as `filename` of `name`."""
    table = {n: dict(md5) for n, md5 in MD5.items()}
    table[name][filename] = hashlib.md5(raw).hexdigest()
    monkeypatch.setattr(cifar, "expected_md5", lambda n: table[n])


@pytest.fixture(autouse=True)
def _our_checksums(monkeypatch: pytest.MonkeyPatch):
    """Checksums of the files written here; an empty loader cache before and after."""
    monkeypatch.setattr(cifar, "expected_md5", lambda name: MD5[name])
    cifar._load_cifar.cache_clear()
    yield
    cifar._load_cifar.cache_clear()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    for name in FILES:
        write(root, name)
    return root


@pytest.fixture
def copy_root(cifar_root: Path, tmp_path: Path) -> Path:
    """A private copy of the data root that a test may damage."""
    root = tmp_path / "root"
    shutil.copytree(cifar_root, root)
    return root


def one_line_error(call, *args) -> str:
    with pytest.raises(CfbenchError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the reader --------------------------------------------------------------------------------

def test_cifar10_reader_returns_exactly_the_pixels_and_labels_written(cifar_root):
    data = cifar.load_cifar("cifar10", cifar_root)
    assert data.x_train.shape == (200, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (50, 3, 32, 32) and data.y_train.dtype == torch.int64
    written = DICTS["cifar10"]["data_batch_3"]
    row, label = written[b"data"][7], written[b"labels"][7]
    image = data.x_train[2 * 40 + 7].numpy()  # batches are concatenated in order 1..5
    np.testing.assert_array_equal(image[0], row[:1024].reshape(32, 32))     # red plane
    np.testing.assert_array_equal(image[1], row[1024:2048].reshape(32, 32))  # green plane
    np.testing.assert_array_equal(image[2], row[2048:].reshape(32, 32))     # blue plane
    assert int(data.y_train[2 * 40 + 7]) == label
    everything = np.concatenate([DICTS["cifar10"][f"data_batch_{i}"][b"data"]
                                 for i in range(1, 6)])
    np.testing.assert_array_equal(data.x_train.flatten(1).numpy(), everything)
    np.testing.assert_array_equal(data.y_test.numpy(), DICTS["cifar10"]["test_batch"][b"labels"])
    assert data.class_names == tuple(f"class{c}" for c in range(10))


def test_cifar100_reader_uses_the_fine_labels(cifar_root):
    data = cifar.load_cifar("cifar100", cifar_root)
    written = DICTS["cifar100"]["train"]
    np.testing.assert_array_equal(data.y_train.numpy(), written[b"fine_labels"])
    np.testing.assert_array_equal(data.x_train[5, 2].numpy(),
                                  written[b"data"][5, 2048:].reshape(32, 32))
    assert len(data.y_test) == 500 and len(data.class_names) == 100


def test_checksums_come_from_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    ten, hundred = TORCHVISION_MD5("cifar10"), TORCHVISION_MD5("cifar100")
    assert set(ten) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}
    assert ten["data_batch_3"] == dict(CIFAR10.train_list)["data_batch_3"]
    assert ten["batches.meta"] == CIFAR10.meta["md5"]
    assert hundred == {"train": dict(CIFAR100.train_list)["train"],
                       "test": dict(CIFAR100.test_list)["test"], "meta": CIFAR100.meta["md5"]}


def test_a_changed_byte_is_a_checksum_mismatch(copy_root):
    path = copy_root / FOLDER["cifar10"] / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:])
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    got = hashlib.md5(path.read_bytes()).hexdigest()
    assert message.startswith(f"checksum mismatch for {path.resolve()}: md5 {got[:12]}..., "
                              f"expected {MD5['cifar10']['data_batch_2'][:12]}...")
    assert "delete it and fetch again" in message


def test_a_missing_file_names_it_the_directory_and_both_fixes(copy_root):
    (copy_root / FOLDER["cifar10"] / "test_batch").unlink()
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    root = copy_root.resolve()
    assert message == (f"cifar10 file 'test_batch' not found in {root / 'cifar-10-batches-py'}; "
                       f"run `cfbench data fetch cifar10 --data-root {root}`, or download "
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it "
                       f"in {root}")


def test_a_truncated_pickle_is_reported_as_unreadable(copy_root, monkeypatch):
    truncated = FILES["cifar10"]["data_batch_1"][:5000]
    write(copy_root, "cifar10", {"data_batch_1": truncated})
    expect(monkeypatch, "cifar10", "data_batch_1", truncated)  # the checksum passes, parsing not
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    assert "data_batch_1 is not a readable CIFAR pickle" in message
    assert "delete it and fetch again" in message


def test_a_pickle_with_other_keys_names_the_missing_key(copy_root, monkeypatch):
    wrong = FILES["cifar100"]["test"]  # a CIFAR-100 batch where a CIFAR-10 one belongs
    write(copy_root, "cifar10", {"test_batch": wrong})
    expect(monkeypatch, "cifar10", "test_batch", wrong)
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    assert "test_batch has no key b'labels'" in message and "b'fine_labels'" in message


def test_a_batch_of_the_wrong_shape_is_rejected(copy_root, monkeypatch):
    content = dict(DICTS["cifar10"]["data_batch_4"])
    content[b"data"] = content[b"data"][:, :1024]  # one plane only
    raw = pickled(content)
    write(copy_root, "cifar10", {"data_batch_4": raw})
    expect(monkeypatch, "cifar10", "data_batch_4", raw)
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    assert "data_batch_4: b'data' must be uint8 N x 3072, got uint8 (40, 1024)" in message


def test_a_pickle_that_would_run_code_is_refused_unrun(copy_root, monkeypatch, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(marker)))

    raw = pickle.dumps({b"data": Payload()}, protocol=2)
    write(copy_root, "cifar10", {"data_batch_5": raw})
    expect(monkeypatch, "cifar10", "data_batch_5", raw)
    message = one_line_error(cifar.load_cifar, "cifar10", copy_root)
    assert "not a readable CIFAR pickle (refers to shutil.copy" in message
    assert not marker.exists()


def test_the_cli_reports_missing_cifar_in_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "records"
    code = main(["run", "--scenario", "split-cifar10", "--strategy", "naive", "--quiet",
                 "--data-root", str(tmp_path / "empty"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cfbench: error: cifar10 file 'data_batch_1' not found")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "`cfbench data fetch cifar10 --data-root" in err and "cifar-10-python.tar.gz" in err
    assert not out.exists()


def test_the_cli_reports_a_checksum_mismatch_in_one_line_exit_2(copy_root, tmp_path, capsys):
    path = copy_root / FOLDER["cifar100"] / "meta"
    path.write_bytes(path.read_bytes() + b"\0")
    code = main(["run", "--scenario", "split-cifar100", "--strategy", "naive", "--quiet",
                 "--data-root", str(copy_root), "--out", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("cfbench: error: checksum mismatch for") and "meta" in err


# --- fetching ----------------------------------------------------------------------------------

def fake_torchvision(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes] | None,
                     error: Exception | None = None) -> None:
    """Replace torchvision.datasets.CIFAR10: it raises `error`, or 'extracts' `files`."""
    from torchvision import datasets

    def cifar10(root: str, train: bool, download: bool) -> None:
        assert download
        if error is not None:
            raise error
        write(Path(root), "cifar10", files)

    monkeypatch.setattr(datasets, "CIFAR10", cifar10)


def test_fetch_without_network_fails_in_one_line_naming_the_manual_download(tmp_path,
                                                                            monkeypatch):
    fake_torchvision(monkeypatch, None, urllib.error.URLError("Name or service not known"))
    message = one_line_error(cifar.fetch_cifar, "cifar10", tmp_path)
    assert message == (f"could not fetch cifar10 into {tmp_path}: torchvision.datasets.CIFAR10"
                       "(download=True) failed: <urlopen error Name or service not known>. "
                       "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand "
                       f"and extract it in {tmp_path}")
    assert list(tmp_path.iterdir()) == []  # no scratch directory left behind


def test_fetch_verifies_every_file_before_moving_any_into_place(tmp_path, monkeypatch):
    bad = dict(FILES["cifar10"], test_batch=FILES["cifar10"]["test_batch"][:-1])
    fake_torchvision(monkeypatch, bad)
    assert "checksum mismatch" in one_line_error(cifar.fetch_cifar, "cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []
    fake_torchvision(monkeypatch, FILES["cifar10"])
    assert cifar.fetch_cifar("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]
    assert int(cifar.load_cifar("cifar10", tmp_path).y_test[3]) == \
        DICTS["cifar10"]["test_batch"][b"labels"][3]
    fake_torchvision(monkeypatch, None, AssertionError("present files are not fetched again"))
    cifar.fetch_cifar("cifar10", tmp_path)


# --- scenarios ---------------------------------------------------------------------------------

def build(name: str, root: Path, seed: int = 0, **options):
    return registry.scenarios.get(name).factory(data_root=root, seed=seed, **options)


EXPECTED_GROUPS = {
    "split-cifar10": [(2 * t, 2 * t + 1) for t in range(5)],
    "split-cifar100": [tuple(range(10 * t, 10 * t + 10)) for t in range(10)],
    "split-cifar100-20": [tuple(range(5 * t, 5 * t + 5)) for t in range(20)],
}


@pytest.mark.parametrize("setting", ["task", "class"])
@pytest.mark.parametrize("scenario", list(EXPECTED_GROUPS))
def test_split_cifar_runs_end_to_end(cifar_root, scenario, setting):
    record = run_one(cifar_root, scenario, setting, "naive", iterations=2,
                     model="resnet18-reduced:4")
    groups = EXPECTED_GROUPS[scenario]
    R = np.asarray(record.R)
    assert R.shape == (len(groups) + 1, len(groups))
    assert [tuple(t["classes"]) for t in record.tasks] == groups
    for task, classes in zip(record.tasks, groups, strict=True):
        assert task["n_train"] == TRAIN_PER_CLASS * len(classes)
        assert task["n_test"] == TEST_PER_CLASS * len(classes)
        assert task["steps"] == 2
    assert record.config["protocol"]["batch_size"] == 32
    assert record.config["protocol"]["optimizer"] == "sgd"


def test_split_cifar_tasks_hold_their_classes_and_follow_the_seed(cifar_root):
    scenario = build("split-cifar100", cifar_root, tasks=20)
    assert [t.classes for t in scenario.tasks] == EXPECTED_GROUPS["split-cifar100-20"]
    for task in scenario.tasks:
        assert set(task.y_train.tolist()) == set(task.classes)
        assert set(task.y_test.tolist()) == set(task.classes)
    a = build("split-cifar10", cifar_root, seed=3, shuffle_classes=True)
    b = build("split-cifar10", cifar_root, seed=3, shuffle_classes=True)
    c = build("split-cifar10", cifar_root, seed=4, shuffle_classes=True)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]
    assert [t.classes for t in a.tasks] != EXPECTED_GROUPS["split-cifar10"]
    assert sorted(x for t in a.tasks for x in t.classes) == list(range(10))
    shuffled = build("split-cifar100-20", cifar_root, seed=1, shuffle_classes=True)
    assert sorted(x for t in shuffled.tasks for x in t.classes) == list(range(100))
    assert len(shuffled.tasks) == 20


def test_split_cifar100_tasks_must_divide_100_and_the_preset_fixes_them(cifar_root, capsys):
    with pytest.raises(CfbenchError, match="bad options for scenario 'split-cifar100': tasks "
                                           "must divide the 100 classes, got 3"):
        plan_runs(scenario="split-cifar100", settings=["task"], strategies=["naive"],
                  hparams={}, seeds=[0], scenario_options={"tasks": 3}, data_root=cifar_root)
    code = main(["run", "--scenario", "split-cifar100-20", "--strategy", "naive", "--tasks",
                 "10", "--data-root", str(cifar_root), "--quiet"])
    assert code == 2 and "--tasks does not apply" in capsys.readouterr().err


def test_split_cifar_normalises_per_channel_and_augments_by_default(cifar_root):
    ten, hundred = build("split-cifar10", cifar_root), build("split-cifar100", cifar_root)
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    for scenario, mean, std in ((ten, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                                (hundred, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))):
        expected = [(1 - m) / s for m, s in zip(mean, std, strict=True)]
        np.testing.assert_allclose(scenario.prepare(white)[0, :, 5, 5].numpy(), expected,
                                   rtol=1e-6)
        assert scenario.augmentation == CropFlip(padding=4, flip=True)
        assert scenario.settings == ("task", "class")
        assert scenario.protocol.model == "resnet18-reduced:20" and scenario.protocol.lr == 0.03
    assert build("split-cifar10", cifar_root, augment=False).augmentation is None


# --- augmentation ------------------------------------------------------------------------------

def windows(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Every 32x32 window of the zero-padded image, unflipped then flipped: (2 * 81) x C x H x W,
    index flip * 81 + top * 9 + left."""
    padded = F.pad(image, (padding,) * 4)
    side, span = image.shape[-1], 2 * padding + 1
    crops = torch.stack([padded[:, top:top + side, left:left + side]
                         for top in range(span) for left in range(span)])
    return torch.cat([crops, crops.flip(3)])


def augment(pixels: torch.Tensor, seed: int, transform: CropFlip = CIFAR_AUGMENTATION
            ) -> torch.Tensor:
    return transform(pixels, torch.Generator().manual_seed(seed))


def test_augmentation_is_a_function_of_the_generator_seed():
    pixels = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment(pixels, 5), augment(pixels, 5))
    assert not torch.equal(augment(pixels, 5), augment(pixels, 6))


def test_every_augmented_image_is_a_window_of_the_padded_image_possibly_flipped():
    pixels = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1)) + 0.01
    out = augment(pixels, 0)
    for image, result in zip(pixels, out, strict=True):
        matches = (windows(image) == result).flatten(1).all(1)
        assert int(matches.sum()) == 1  # exactly one of the 9 x 9 x 2 possibilities


def test_without_padding_or_flip_augmentation_is_the_identity():
    pixels = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(augment(pixels, 0, CropFlip(padding=0, flip=False)), pixels)


def test_over_many_draws_every_offset_and_both_flips_occur():
    rows = torch.arange(1, 33, dtype=torch.float32).view(32, 1).expand(32, 32)
    image = torch.stack([rows, rows.T, torch.ones(32, 32)]) / 64  # pixels name their position
    out = augment(image.expand(4000, -1, -1, -1), 3)
    candidates = windows(image)
    # The centre pixel's row and column and its right neighbour's column identify the window.
    key = lambda x: torch.stack([x[:, 0, 16, 16], x[:, 1, 16, 16], x[:, 1, 16, 17]], 1)  # noqa: E731
    which = (key(out)[:, None] == key(candidates)[None]).all(2).float().argmax(1)
    assert torch.equal(out, candidates[which])
    assert sorted(set(which.tolist())) == list(range(162))


class Recorder(nn.Module):
    """A model that remembers every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def test_evaluation_is_never_augmented_while_training_is(cifar_root):
    built = build("split-cifar10", cifar_root)
    one_step = dataclasses.replace(built.protocol, epochs=None, iterations=1)
    scenario = dataclasses.replace(built, protocol=one_step)
    plain = dataclasses.replace(scenario, augmentation=None)
    model = Recorder()
    torch.manual_seed(0)
    ctx = TrainContext.create(model, scenario, Setting(scenario, "task"), seed=0)
    R = evaluate(ctx)
    assert evaluate(TrainContext.create(model, plain, Setting(plain, "task"), seed=0)) == R
    evaluated = torch.cat(model.inputs[:5])  # one batch per task, the first evaluation
    assert torch.equal(evaluated, torch.cat([scenario.prepare(t.x_test) for t in scenario.tasks]))
    # The control: training batches of the same scenario are augmented.
    model.inputs.clear()
    ctx.task_index = 0
    train_task(ctx, Strategy(), scenario.tasks[0])
    (trained,) = model.inputs
    originals = scenario.prepare(scenario.tasks[0].x_train)
    unchanged = (trained[:, None] == originals[None]).flatten(2).all(2).any(1)
    assert len(trained) == 32 and int(unchanged.sum()) < 4  # identity: 1 in 162
