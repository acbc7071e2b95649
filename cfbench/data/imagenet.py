"""ImageNet-1k as a transfer source: a validation folder read as uint8 tensors, and resnet18's
pretrained weights.

The folder is in ImageFolder layout, ``<dir>/<wnid>/<image>.JPEG|.jpg|.png``, with exactly 1000
wnid folders (``n01440764`` ...); their sorted order is the class index, torchvision's
convention for its ImageNet weights. Images are decoded with PIL and transformed as
torchvision's IMAGENET1K_V1 evaluation transform does (bilinear resize of the shorter side to
256 * size / 224, centre crop to size), then kept as uint8. Decoding thousands of JPEGs takes
minutes, so the result is cached in ``<data root>/cache/`` and rebuilt when the chosen files
change or the cache is unreadable.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from tqdm.auto import tqdm

from cfbench.errors import CfbenchError

N_CLASSES = 1000
EXTENSIONS = (".jpeg", ".jpg", ".png")
WNID = re.compile(r"n\d{8}")
CACHE_VERSION = 1
LAYOUT_HINT = ("one folder per wnid holding its validation images, e.g. "
               "n01440764/ILSVRC2012_val_00000293.JPEG; torchvision.datasets.ImageNet(root, "
               "split='val') builds it from ILSVRC2012_img_val.tar and "
               "ILSVRC2012_devkit_t12.tar.gz")
SAVE_HINT = "save one with torch.save(torchvision.models.resnet18().state_dict(), path)"


@dataclass(frozen=True)
class ImageNetSubset:
    """A class-balanced subset: uint8 images N x 3 x size x size, labels 0..999 (int64), the
    part strategies may train or estimate on, and the part the source is evaluated on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def class_folders(directory: Path) -> list[Path]:
    """The 1000 wnid folders in class order, or a CfbenchError saying what is wrong."""
    if not directory.is_dir():
        raise CfbenchError(f"ImageNet validation folder {directory} not found; put the "
                           f"ILSVRC2012 validation images there, {LAYOUT_HINT}")
    folders = sorted(p for p in directory.iterdir() if p.is_dir())
    if len(folders) != N_CLASSES:
        raise CfbenchError(f"ImageNet folder {directory} has {len(folders)} class folders, "
                           f"expected exactly {N_CLASSES} (their sorted order is the class "
                           f"index of the pretrained weights); {LAYOUT_HINT}")
    odd = [p.name for p in folders if not WNID.fullmatch(p.name)]
    if odd:
        raise CfbenchError(f"ImageNet folder {directory} has class folders not named by wnid "
                           f"(e.g. '{odd[0]}'), so their sorted order is not the class index of "
                           f"the pretrained weights; {LAYOUT_HINT}")
    return folders


def choose_files(folders: list[Path], per_class: int) -> list[Path]:
    """The first `per_class` images of each folder by sorted file name, class after class."""
    chosen = []
    for folder in folders:
        images = sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in EXTENSIONS and p.is_file())
        if len(images) < per_class:
            raise CfbenchError(f"ImageNet class folder {folder} has {len(images)} images "
                               f"(.JPEG/.jpg/.png), fewer than per_class={per_class}; lower "
                               "per_class or complete the folder")
        chosen += images[:per_class]
    return chosen


def eval_transform(path: Path, size: int) -> torch.Tensor:
    """One image as torchvision's IMAGENET1K_V1 evaluation transform sees it before
    normalisation: RGB, shorter side resized (bilinear, antialiased) to round(256 * size /
    224), centre crop size x size; uint8 3 x size x size."""
    import torchvision.transforms.functional as TF
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CfbenchError(f"cannot decode image {path} ({exc}); replace or delete it") from None
    resized = TF.resize(rgb, round(256 * size / 224), TF.InterpolationMode.BILINEAR,
                        antialias=True)
    return TF.pil_to_tensor(TF.center_crop(resized, [size, size]))


def _fingerprint(directory: Path, files: list[Path], size: int) -> str:
    """Names, sizes and modification times of the chosen files: changes when any of them do."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def _read_cache(path: Path, fingerprint: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached images if the cache is readable and made from the same files, else None."""
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a missing, truncated or foreign file alike: rebuild it
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint:
        return None
    images = cached.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or tuple(images.shape) != shape:
        return None
    return images


def load_imagenet_val(directory: Path, per_class: int, size: int, cache_dir: Path
                      ) -> ImageNetSubset:
    """`per_class` images of every class (the first by sorted file name), at `size` x `size`.

    Of each class's images, the first per_class // 2 form the train part (for strategies: a
    Fisher estimate, a replay buffer) and the rest the test part (the source's accuracy).
    """
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2 (one image of each class for the train part, "
                         f"one for the test part), got {per_class}")
    directory = directory.expanduser().resolve()
    files = choose_files(class_folders(directory), per_class)
    fingerprint = _fingerprint(directory, files, size)
    key = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    cache = cache_dir / f"imagenet-{key}-{per_class}pc-{size}px.pt"
    shape = (len(files), 3, size, size)
    images = _read_cache(cache, fingerprint, shape)
    if images is None:
        images = torch.empty(shape, dtype=torch.uint8)

        def decode(i: int) -> None:
            images[i] = eval_transform(files[i], size)

        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            list(tqdm(pool.map(decode, range(len(files))), total=len(files), disable=None,
                      desc=f"decoding ImageNet images into {cache.name}"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.partial")  # one per writer
        torch.save({"fingerprint": fingerprint, "images": images}, partial)
        os.replace(partial, cache)
    labels = torch.arange(N_CLASSES).repeat_interleave(per_class)
    in_train = (torch.arange(len(files)) % per_class) < per_class // 2
    return ImageNetSubset(images[in_train], labels[in_train], images[~in_train],
                          labels[~in_train])


def resnet18_weights(weights: str) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state_dict: torchvision's named weights (e.g. IMAGENET1K_V1,
    downloaded by torchvision into its hub cache), or else a local checkpoint file saved with
    ``torch.save(resnet18().state_dict(), path)``; checked against resnet18's keys and
    shapes."""
    from torchvision.models import ResNet18_Weights, resnet18

    if weights in ResNet18_Weights.__members__:
        named = ResNet18_Weights[weights]
        try:
            return named.get_state_dict(progress=False, check_hash=True)  # name has its hash
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a Runtime
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
            name = Path(urlparse(named.url).path).name
            raise CfbenchError(f"could not download torchvision's resnet18 {weights} weights "
                               f"({reason}); without internet, copy {named.url} to "
                               f"{checkpoints / name}, or pass weights=PATH to a resnet18 "
                               "state_dict file") from None
    path = Path(weights).expanduser()
    if path.is_dir():
        raise CfbenchError(f"weights {path} is a directory; pass the checkpoint file itself, "
                           f"or {SAVE_HINT}")
    if not path.is_file():
        raise CfbenchError(f"weights '{weights}' is neither a torchvision ResNet18_Weights name "
                           f"({', '.join(ResNet18_Weights.__members__)}) nor an existing file; "
                           f"{SAVE_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the file is, it is not a checkpoint we can read
        rejected = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if rejected:
            raise CfbenchError(f"weights file {path} refers to {rejected[1]}, which cfbench "
                               "refuses to unpickle (it loads plain tensors only; the file may "
                               f"be hostile, or another program's); {SAVE_HINT}") from None
        # torch wraps its reason in advice to turn the protection off: keep only the reason
        kept = [p for p in re.split(r"\n\s*\n", str(exc)) if "weights_only" not in p]
        reason = " ".join(" ".join(kept).split())[:200] or type(exc).__name__
        raise CfbenchError(f"weights file {path} is not a readable PyTorch checkpoint "
                           f"({reason}); {SAVE_HINT}") from None
    with torch.device("meta"):
        reference = resnet18().state_dict()
    problem = _mismatch(state, reference)
    if problem:
        raise CfbenchError(f"weights file {path} is not a torchvision resnet18 state_dict "
                           f"({problem}); {SAVE_HINT}")
    return state


def _mismatch(state: object, reference: Mapping[str, torch.Tensor]) -> str:
    """What keeps `state` from being a state_dict of `reference`'s shape ('' if nothing)."""
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a dict of tensors"
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} instead of {tuple(v.shape)}"
             for k, v in reference.items()
             if k in state and getattr(state[k], "shape", None) != v.shape]
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("wrong shape", wrong)) if keys]
    return "; ".join(parts)


def load_resnet18(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Put a torchvision resnet18 state_dict into cfbench's ``resnet18`` backbone: ``fc.*``
    into the head's first 1000 rows (its other rows keep their initialisation), every other
    key into ``features``."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        if not isinstance(features, nn.Module) or not isinstance(head, nn.Linear) \
                or head.in_features != 512 or head.out_features < N_CLASSES:
            raise RuntimeError("no features/head of resnet18's shape")
        features.load_state_dict(body)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CfbenchError(f"the model does not take resnet18's ImageNet weights ({reason}); "
                           "use --model resnet18") from None
    with torch.no_grad():
        head.weight[:N_CLASSES].copy_(state["fc.weight"])
        head.bias[:N_CLASSES].copy_(state["fc.bias"])
