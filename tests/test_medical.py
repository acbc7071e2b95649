"""imagenet-to-medmnist and its readers, on files written in the exact on-disk formats: MedMNIST
npz archives (the real array names, dtypes and shapes; one RGB and one grey dataset), an
ImageNet validation tree of 1000 wnid folders (JPEG and PNG), and a torchvision resnet18
state_dict. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import os
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import ResNet18_Weights

import cfbench.scenarios.medical  # noqa: F401  (registers imagenet-to-medmnist)
from cfbench.cli import main
from cfbench.data import imagenet, medmnist
from cfbench.errors import CfbenchError
from cfbench.experiment import execute, load_scenario, plan_runs
from cfbench.registry import scenarios
from cfbench.scenarios.medical import resize_images, stratified_subset

SPLIT_SIZES = {"train": 20, "val": 4, "test": 5}  # images per class
IMAGE_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision uses


def medmnist_arrays(flag: str, size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """A dataset as the medmnist package stores it: uint8 images N x S x S (grey) or
    N x S x S x 3 (RGB), uint8 labels N x 1, classes shuffled within each split."""
    rng = np.random.default_rng(seed)
    info = medmnist.FLAGS[flag]
    shape = (size, size) if info.channels == 1 else (size, size, 3)
    arrays = {}
    for split, per_class in SPLIT_SIZES.items():
        labels = rng.permutation(np.repeat(np.arange(info.n_classes), per_class))
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    return arrays


WRITTEN = {"dermamnist": medmnist_arrays("dermamnist"),  # RGB, 7 classes
           "organamnist": medmnist_arrays("organamnist", seed=1)}  # grey, 11 classes


def write_npz(root: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    path = root / "medmnist" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A data root holding the two MedMNIST files and an ImageNet validation tree: 1000 wnid
    folders with a JPEG and a PNG each (random pixels, neither square nor 32x32, so the resize
    and the crop both matter), a third image in two of them, and a file that is no image."""
    root = tmp_path_factory.mktemp("medical-root")
    for flag, arrays in WRITTEN.items():
        write_npz(root, f"{flag}.npz", arrays)
    rng = np.random.default_rng(2)
    for c in range(imagenet.N_CLASSES):
        folder = root / "imagenet" / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            folder / f"ILSVRC2012_val_{2 * c:08d}.JPEG", quality=95)
        Image.fromarray(rng.integers(0, 256, (44, 36, 3), dtype=np.uint8)).save(
            folder / f"ILSVRC2012_val_{2 * c + 1:08d}.png")
    for c in (0, 999):  # a third image, last by name: per_class=2 leaves it out
        Image.new("RGB", (40, 40), (0, 255, 0)).save(
            root / "imagenet" / "val" / f"n{c:08d}" / "ILSVRC2012_val_99999999.jpg")
    (root / "imagenet" / "val" / "n00000000" / "LICENSE.txt").write_text("not an image")
    return root


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def checkpoint(root, tmp_path_factory) -> Path:
    """A resnet18 state_dict that classifies the test images of the tree: a seeded random
    backbone whose fc is the nearest-prototype rule on its own features (row c = the feature
    of class c's test image, bias -|row|^2/2), so a loaded checkpoint scores near 100% where
    an untrained model scores near 0.1%."""
    subset = imagenet.load_imagenet_val(root / "imagenet" / "val", 2, IMAGE_SIZE, root / "cache")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    fc, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        features = net(normalised(subset.x_test))
        fc.weight[subset.y_test] = features
        fc.bias.copy_(-0.5 * fc.weight.pow(2).sum(1))
    net.fc = fc
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path


def options(checkpoint: Path, root: Path, **changes) -> dict:
    return {"weights": str(checkpoint), "imagenet_val": str(root / "imagenet" / "val"),
            "per_class": 2, "targets": ("dermamnist", "organamnist"),
            "image_size": IMAGE_SIZE, "max_train": 50, **changes}


# --- MedMNIST ------------------------------------------------------------------------------

def test_medmnist_reader_returns_what_was_written(root):
    rgb, grey = (medmnist.load_medmnist(f, root) for f in ("dermamnist", "organamnist"))
    for data, flag in ((rgb, "dermamnist"), (grey, "organamnist")):
        written = WRITTEN[flag]
        for split in ("train", "val", "test"):
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            assert y.dtype == np.int64 and y.tolist() == written[f"{split}_labels"][:, 0].tolist()
            assert x.dtype == np.uint8 and x.shape == (len(y), 3, 28, 28)
    # RGB: channels first, the same pixels; grey: the one channel repeated three times.
    assert np.array_equal(rgb.x_test[3], WRITTEN["dermamnist"]["test_images"][3].transpose(2, 0, 1))
    for channel in range(3):
        assert np.array_equal(grey.x_train[5, channel], WRITTEN["organamnist"]["train_images"][5])
    assert (rgb.n_classes, grey.n_classes) == (7, 11)
    raw = medmnist.load_medmnist("organamnist", root, rgb=False)
    assert raw.x_val.shape == (44, 1, 28, 28)
    assert np.array_equal(raw.x_val[:, 0], WRITTEN["organamnist"]["val_images"])


def test_larger_sizes_use_the_packages_file_names(tmp_path):
    assert medmnist.file_name("pathmnist", 28) == "pathmnist.npz"
    assert medmnist.file_name("pathmnist", 224) == "pathmnist_224.npz"
    arrays = medmnist_arrays("bloodmnist", size=64)
    write_npz(tmp_path, "bloodmnist_64.npz", arrays)
    data = medmnist.load_medmnist("bloodmnist", tmp_path, size=64)
    assert data.x_train.shape == (160, 3, 64, 64)
    with pytest.raises(CfbenchError, match="bloodmnist.npz not found"):
        medmnist.load_medmnist("bloodmnist", tmp_path)  # the 28x28 file is another file


def test_checksum_comes_from_medmnist_info_and_a_mismatch_is_refused(root, monkeypatch):
    fake = types.ModuleType("medmnist")
    fake.INFO = {"dermamnist": {"MD5": "a" * 32, "MD5_64": "b" * 32}}
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    assert medmnist.expected_md5("dermamnist", 28) == "a" * 32
    assert medmnist.expected_md5("dermamnist", 64) == "b" * 32
    assert medmnist.expected_md5("dermamnist", 128) is None  # an older package: no such key
    with pytest.raises(CfbenchError) as exc:
        medmnist.load_medmnist("dermamnist", root)
    message = one_line(exc)
    assert message.startswith("checksum mismatch for ") and "dermamnist.npz" in message
    assert "expected " + "a" * 32 in message and "cfbench data fetch medmnist" in message
    path = root / "medmnist" / "dermamnist.npz"
    fake.INFO["dermamnist"]["MD5"] = hashlib.md5(path.read_bytes()).hexdigest()
    assert medmnist.load_medmnist("dermamnist", root).x_train.shape[0] == 140
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed: structure only
    assert medmnist.expected_md5("dermamnist", 28) is None


def _bad_arrays(flag: str, **changes) -> dict[str, np.ndarray]:
    arrays = dict(WRITTEN[flag])
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


BAD_FILES = {
    "wrong keys": (lambda: _bad_arrays("organamnist", test_labels=None),
                   "lacks the arrays test_labels"),
    "float images": (lambda: _bad_arrays("organamnist", train_images=WRITTEN["organamnist"]
                                         ["train_images"].astype(np.float32)),
                     "train_images is float32"),
    "grey where RGB is stored": (lambda: _bad_arrays("dermamnist", val_images=WRITTEN[
        "dermamnist"]["val_images"][..., 0]), "expected uint8 of shape (N, 28, 28, 3)"),
    "multi-label labels": (lambda: _bad_arrays("organamnist", test_labels=np.zeros(
        (55, 14), np.uint8)), "expected integers of shape (55, 1)"),
    "label out of range": (lambda: _bad_arrays("organamnist", val_labels=np.full(
        (44, 1), 11, np.uint8)), "outside the 11 classes 0..10"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_structurally_wrong_files_are_one_line_errors_with_the_fix(case, tmp_path):
    make, expected = BAD_FILES[case]
    flag = "dermamnist" if "RGB" in case else "organamnist"
    path = write_npz(tmp_path, f"{flag}.npz", make())
    with pytest.raises(CfbenchError) as exc:
        medmnist.load_medmnist(flag, tmp_path)
    message = one_line(exc)
    assert expected in message and str(path) in message
    assert "pip install medmnist" in message and medmnist.ZENODO in message


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04truncated"])
def test_corrupt_and_missing_files_name_the_file_and_the_fix(tmp_path, content):
    with pytest.raises(CfbenchError) as exc:
        medmnist.load_medmnist("pathmnist", tmp_path)
    message = one_line(exc)
    assert f"{tmp_path / 'medmnist' / 'pathmnist.npz'} not found" in message
    assert "`pip install medmnist` and `cfbench data fetch medmnist --data-root" in message
    assert f"download pathmnist.npz from {medmnist.ZENODO}" in message
    (tmp_path / "medmnist").mkdir()
    (tmp_path / "medmnist" / "pathmnist.npz").write_bytes(content)
    with pytest.raises(CfbenchError) as exc:
        medmnist.load_medmnist("pathmnist", tmp_path)
    assert "pathmnist.npz is not a readable npz file" in one_line(exc)


@pytest.mark.parametrize(("flag", "reason"), [("chestmnist", "multi-label"),
                                              ("organmnist3d", "3D volumes"),
                                              ("mnist", "unknown MedMNIST dataset")])
def test_datasets_without_one_label_per_image_are_refused(tmp_path, flag, reason):
    with pytest.raises(ValueError, match=reason):
        medmnist.load_medmnist(flag, tmp_path)


def test_fetch_uses_the_medmnist_package_or_says_how_to_get_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)
    with pytest.raises(CfbenchError) as exc:
        medmnist.fetch_medmnist(tmp_path, ["organamnist"], 64)
    message = one_line(exc)
    assert "organamnist_64.npz" in message and "pip install medmnist" in message
    assert str(tmp_path / "medmnist") in message and medmnist.ZENODO in message

    calls = []

    class OrganAMNIST:  # the package's class: downloads <flag>[_size].npz into root
        def __init__(self, **kwargs):
            calls.append(kwargs)
            np.savez_compressed(Path(kwargs["root"]) / "organamnist.npz",
                                **WRITTEN["organamnist"])

    fake = types.ModuleType("medmnist")
    fake.INFO, fake.OrganAMNIST = {}, OrganAMNIST
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    assert medmnist.fetch_medmnist(tmp_path, ["organamnist"]) == tmp_path / "medmnist"
    assert calls == [{"split": "train", "download": True, "root": str(tmp_path / "medmnist"),
                      "size": 28}]
    assert medmnist.load_medmnist("organamnist", tmp_path).y_test.shape == (55,)


# --- ImageNet ------------------------------------------------------------------------------

def test_imagenet_reader_takes_the_first_files_and_torchvisions_eval_transform(root):
    val = root / "imagenet" / "val"
    subset = imagenet.load_imagenet_val(val, 2, IMAGE_SIZE, root / "cache")
    classes = torch.arange(1000)
    assert torch.equal(subset.y_train, classes) and torch.equal(subset.y_test, classes)
    assert subset.x_train.shape == subset.x_test.shape == (1000, 3, IMAGE_SIZE, IMAGE_SIZE)
    for c in (0, 417, 999):  # per class: the JPEG (first by name) trains, the PNG tests
        folder = val / f"n{c:08d}"
        assert torch.equal(subset.x_train[c], imagenet.eval_transform(
            folder / f"ILSVRC2012_val_{2 * c:08d}.JPEG", IMAGE_SIZE))
        assert torch.equal(subset.x_test[c], imagenet.eval_transform(
            folder / f"ILSVRC2012_val_{2 * c + 1:08d}.png", IMAGE_SIZE))
    # At 224 the transform is torchvision's IMAGENET1K_V1 preprocessing, normalisation aside.
    reference = ResNet18_Weights.IMAGENET1K_V1.transforms()
    for name in ("ILSVRC2012_val_00000000.JPEG", "ILSVRC2012_val_00000001.png"):
        ours = imagenet.eval_transform(val / "n00000000" / name, 224)
        with Image.open(val / "n00000000" / name) as image:
            theirs = reference(image.convert("RGB"))
        torch.testing.assert_close(normalised(ours), theirs, rtol=0, atol=1e-5)


def test_imagenet_cache_is_used_and_rebuilt_when_stale_or_corrupt(root, tmp_path):
    val = root / "imagenet" / "val"
    first = imagenet.load_imagenet_val(val, 2, IMAGE_SIZE, tmp_path)
    (cache,) = tmp_path.glob("imagenet-*-2pc-32px.pt")
    stored = torch.load(cache, weights_only=True)
    torch.save({**stored, "images": torch.zeros_like(stored["images"])}, cache)
    assert int(imagenet.load_imagenet_val(val, 2, IMAGE_SIZE, tmp_path).x_test.sum()) == 0
    cache.write_bytes(b"garbage")
    again = imagenet.load_imagenet_val(val, 2, IMAGE_SIZE, tmp_path)
    assert torch.equal(again.x_test, first.x_test) and torch.equal(again.x_train, first.x_train)
    # A changed image changes the fingerprint: the cache is rebuilt from the files.
    image = val / "n00000007" / "ILSVRC2012_val_00000015.png"
    original, stat = image.read_bytes(), image.stat()
    try:
        Image.new("RGB", (36, 44), (255, 0, 0)).save(image)
        changed = imagenet.load_imagenet_val(val, 2, IMAGE_SIZE, tmp_path)
        assert changed.x_test[7, 0].eq(255).all() and changed.x_test[7, 1:].eq(0).all()
        assert torch.equal(changed.x_test[8:], first.x_test[8:])
    finally:  # as it was, modification time included, so the module's cache stays valid
        image.write_bytes(original)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_imagenet_folder_errors_name_the_folder_and_the_fix(tmp_path, root):
    with pytest.raises(CfbenchError) as exc:
        imagenet.load_imagenet_val(tmp_path / "missing", 2, IMAGE_SIZE, tmp_path)
    assert "missing not found" in one_line(exc)
    assert "n01440764/ILSVRC2012_val_00000293.JPEG" in str(exc.value)
    short = tmp_path / "val999"
    for c in range(999):
        (short / f"n{c:08d}").mkdir(parents=True)
    with pytest.raises(CfbenchError) as exc:
        imagenet.load_imagenet_val(short, 2, IMAGE_SIZE, tmp_path)
    assert f"{short} has 999 class folders, expected exactly 1000" in one_line(exc)
    (short / "cat").mkdir()
    with pytest.raises(CfbenchError, match="not named by wnid"):
        imagenet.load_imagenet_val(short, 2, IMAGE_SIZE, tmp_path)
    with pytest.raises(CfbenchError) as exc:
        imagenet.load_imagenet_val(root / "imagenet" / "val", 3, IMAGE_SIZE, tmp_path)
    assert "n00000001 has 2 images (.JPEG/.jpg/.png), fewer than per_class=3" in one_line(exc)
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(CfbenchError) as exc:
        imagenet.eval_transform(bad, IMAGE_SIZE)
    assert f"cannot decode image {bad}" in one_line(exc)


# --- weights ---------------------------------------------------------------------------------

class Hostile:
    """Unpickled, it would run a command."""

    def __reduce__(self) -> tuple:
        return os.system, ("echo owned",)


def test_bad_checkpoints_are_one_line_errors_with_the_fix(tmp_path):
    fix = "torch.save(torchvision.models.resnet18().state_dict(), path)"
    cases = {"garbage.pth": b"garbage",
             "resnet10.pth": torchvision.models.resnet18(num_classes=10).state_dict(),
             "resnet34.pth": torchvision.models.resnet34().state_dict(),
             "model.pth": [1, 2, 3],
             "hostile.pth": {"fc.weight": Hostile()}}
    expected = {"garbage.pth": "is not a readable PyTorch checkpoint",
                "resnet10.pth": "wrong shape: fc.weight (10, 512) instead of (1000, 512)",
                "resnet34.pth": "unexpected: layer1.2.conv1.weight",
                "model.pth": "it holds a list, not a dict of tensors",
                "hostile.pth": f"refers to {os.system.__module__}.system, which cfbench refuses "
                               "to unpickle"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(CfbenchError) as exc:
            imagenet.resnet18_weights(str(path))
        message = one_line(exc)
        assert str(path) in message and expected[name] in message and fix in message
        assert "weights_only" not in message  # torch's advice to turn the protection off
    with pytest.raises(CfbenchError, match="neither a torchvision ResNet18_Weights name"):
        imagenet.resnet18_weights(str(tmp_path / "absent.pth"))


def test_offline_weights_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: a download is needed
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CfbenchError) as exc:
        imagenet.resnet18_weights("IMAGENET1K_V1")
    message = one_line(exc)
    assert "could not download torchvision's resnet18 IMAGENET1K_V1 weights" in message
    assert "name resolution" in message
    url = ResNet18_Weights.IMAGENET1K_V1.url
    assert f"copy {url} to {tmp_path / 'hub' / 'checkpoints' / url.rsplit('/', 1)[1]}" \
        in message and "weights=PATH" in message


# --- the scenario ----------------------------------------------------------------------------

def test_stratified_cap_keeps_each_class_share():
    labels = np.repeat(np.arange(4), [100, 50, 3, 1])
    picked = stratified_subset(labels, 20, torch.Generator().manual_seed(0))
    # Shares 11.9, 5.95, 0.6, 0.2 -> floors 11, 5, 0, 0 -> at least one each -> 11, 5, 1, 1,
    # then the two largest remainders (0.95, 0.9) get the two samples left.
    assert np.bincount(labels[picked]).tolist() == [12, 6, 1, 1]
    assert np.array_equal(picked, np.unique(picked))
    again = stratified_subset(labels, 20, torch.Generator().manual_seed(0))
    other = stratified_subset(labels, 20, torch.Generator().manual_seed(1))
    assert np.array_equal(picked, again) and not np.array_equal(picked, other)
    with pytest.raises(ValueError, match="cannot keep each of the 4 classes"):
        stratified_subset(labels, 3, torch.Generator())


def test_resize_keeps_same_size_images_and_resizes_others():
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8)
    assert resize_images(images, 28) is images
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 32), torch.full((2, 1, 32, 32), 77, dtype=torch.uint8))


def test_scenario_tasks_labels_and_images(root, checkpoint):
    built = load_scenario("imagenet-to-medmnist", options(checkpoint, root), 0, root, "cpu")
    source, derma, organ = built.tasks
    assert [t.name for t in built.tasks] == ["imagenet", "dermamnist", "organamnist"]
    assert derma.classes == tuple(range(1000, 1007))
    assert organ.classes == tuple(range(1007, 1018)) and built.n_classes == 1018
    assert built.settings == scenarios.get("imagenet-to-medmnist").settings == ("task", "class")
    assert built.input_shape == (3, 32, 32)
    assert built.mean == MEAN and built.std == STD
    for task, flag in ((derma, "dermamnist"), (organ, "organamnist")):
        first = task.classes[0]
        assert torch.equal(task.y_test, torch.from_numpy(
            WRITTEN[flag]["test_labels"][:, 0].astype(np.int64) + first))
        counts = torch.bincount(task.y_train - first).tolist()
        share = 50 / len(task.classes)
        assert sum(counts) == 50 and set(counts) <= {int(share), int(share) + 1}
    assert organ.x_train.shape == (50, 3, 32, 32)
    assert torch.equal(organ.x_test[:, 0], organ.x_test[:, 2])  # grey -> three equal channels
    assert not torch.equal(derma.x_test[:, 0], derma.x_test[:, 2])
    assert len(source.y_train) == len(source.y_test) == 1000


def test_runs_end_to_end_with_the_checkpoint_as_the_source(root, checkpoint):
    (config,) = plan_runs(scenario="imagenet-to-medmnist", settings=["task"],
                          strategies=["naive"], hparams={}, seeds=[0],
                          scenario_options=options(checkpoint, root),
                          protocol_overrides={"iterations": 2}, data_root=root)
    record = execute(config, root)
    assert record.status == "ok", record.error
    R = np.asarray(record.R)
    assert R.shape == (4, 3)  # untrained, pretrained, after each of the two targets
    # Row 1's source accuracy is the checkpoint's own, computed here with plain torchvision.
    source = load_scenario("imagenet-to-medmnist", config.scenario_options, 0, root,
                           "cpu").tasks[0]
    net = torchvision.models.resnet18().eval()
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        predicted = net(normalised(source.x_test)).argmax(1)
    plain = float((predicted == source.y_test).float().mean())
    assert R[1, 0] == pytest.approx(plain, abs=1e-9) and plain > 0.9
    assert R[0, 0] < 0.05  # the untrained model: the load is what made it accurate
    assert record.metrics["rem_source"] == pytest.approx(100 * R[3, 0] / R[1, 0])
    assert [t["steps"] for t in record.tasks[1:]] == [2, 2]


def test_bad_options_are_named(root, checkpoint):
    for changes, expected in [({"targets": ("chestmnist",)}, "multi-label"),
                              ({"medmnist_size": 32}, "sizes 28, 64, 128, 224"),
                              ({"image_size": 16}, "image_size must be >= 32"),
                              ({"max_train": 5}, "max_train=5 cannot keep each of the 7"),
                              ({"per_class": 1}, "per_class must be >= 2")]:
        with pytest.raises(CfbenchError) as exc:
            load_scenario("imagenet-to-medmnist", scenarios.get("imagenet-to-medmnist").resolve(
                options(checkpoint, root, **changes)), 0, root, "cpu")
        message = one_line(exc)
        assert message.startswith("bad options for scenario 'imagenet-to-medmnist'")
        assert expected in message


def test_cli_bad_data_is_exit_2_one_line_without_traceback(tmp_path, capsys):
    plugin = tmp_path / "medical_plugin.py"
    plugin.write_text("import cfbench.scenarios.medical  # noqa: F401\n")
    base = ["run", "--scenario", "imagenet-to-medmnist", "--strategy", "naive", "--quiet",
            "--plugin", str(plugin), "--out", str(tmp_path / "records")]
    assert main([*base, "--data-root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfbench: error: MedMNIST file ") and err.count("\n") == 1
    assert str(tmp_path / "empty" / "medmnist" / "pathmnist.npz") in err
    assert "pip install medmnist" in err
    corrupt = tmp_path / "corrupt"
    (corrupt / "medmnist").mkdir(parents=True)
    (corrupt / "medmnist" / "pathmnist.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main([*base, "--data-root", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "pathmnist.npz is not a readable npz file" in err
    assert not (tmp_path / "records").exists()


def test_cli_bad_checkpoint_in_a_sweep_is_exit_2_one_line(root, tmp_path, capsys):
    plugin = tmp_path / "medical_plugin.py"
    plugin.write_text("import cfbench.scenarios.medical  # noqa: F401\n")
    bad = tmp_path / "resnet18.pth"
    bad.write_bytes(b"not a checkpoint")
    sweep = tmp_path / "medical.yaml"
    sweep.write_text(
        "scenarios:\n  imagenet-to-medmnist:\n"
        f"    weights: {bad}\n    imagenet_val: {root / 'imagenet' / 'val'}\n"
        "    targets: dermamnist,organamnist\n    per_class: 2\n    image_size: 32\n"
        "strategies: naive\nprotocol:\n  iterations: 2\n")
    code = main(["sweep", str(sweep), "--plugin", str(plugin), "--data-root", str(root),
                 "--store", str(tmp_path / "store.sqlite"), "--executor", "serial"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"weights file {bad} is not a readable PyTorch checkpoint" in err
    assert "torch.save(torchvision.models.resnet18().state_dict(), path)" in err
    assert not (tmp_path / "store.sqlite").exists()
