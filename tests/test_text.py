"""Tests for cfbench.data.text: corpora extracted from Debian packages, verified by the SHA-256
recorded in code, written all-or-nothing, and split by whole documents."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cfbench.data import text
from cfbench.data.text import (
    CORPORA,
    Document,
    Package,
    fetch_corpus,
    load_corpus,
    split_documents,
)
from cfbench.errors import CfbenchError

FORTUNES_DOCUMENTS = 15124


def test_fortunes_is_verified_and_described(fortunes_root: Path) -> None:
    corpus = load_corpus("fortunes", fortunes_root)
    assert corpus.sha256 == CORPORA["fortunes"].sha256
    raw = (fortunes_root / "text/fortunes/documents.jsonl").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == corpus.sha256
    manifest = corpus.manifest
    assert manifest["sha256"] == corpus.sha256
    assert manifest["packages"] == [{"name": "fortunes-min", "version": "1:1.99.1-7.3"},
                                    {"name": "fortunes", "version": "1:1.99.1-7.3"}]
    assert manifest["documents"] == len(corpus.documents) == FORTUNES_DOCUMENTS
    assert "usr/share/games/fortunes/wisdom" in manifest["files"]
    assert not any(f.endswith((".dat", "ascii-art")) for f in manifest["files"])
    assert len({d.id for d in corpus.documents}) == len(corpus.documents)
    assert len({d.text for d in corpus.documents}) == len(corpus.documents)  # duplicates dropped
    assert all(d.text and "\n%\n" not in f"\n{d.text}\n" and "\x08" not in d.text
               for d in corpus.documents)
    assert corpus.documents[0] == Document("usr/share/games/fortunes/fortunes#0",
                                           "A day for firm decisions!!!!!  Or is it?")


def _copy_fortunes(fortunes_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(fortunes_root / "text/fortunes", tmp_path / "text/fortunes")
    return tmp_path


def test_an_altered_or_missing_corpus_is_refused(fortunes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CfbenchError, match=r"not found .* `cfbench data fetch fortunes"):
        load_corpus("fortunes", tmp_path)
    root = _copy_fortunes(fortunes_root, tmp_path)
    path = root / "text/fortunes/documents.jsonl"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CfbenchError, match="checksum mismatch .*cfbench data fetch fortunes") as e:
        load_corpus("fortunes", root)
    assert "\n" not in str(e.value)


def test_a_fetch_that_does_not_verify_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b'{"id": "a", "text": "not the corpus"}\n'
    manifest = {"sha256": hashlib.sha256(payload).hexdigest()}
    monkeypatch.setattr(text, "build_corpus", lambda name, scratch: (payload, manifest))
    with pytest.raises(CfbenchError, match="fortunes-min=1:1.99.1-7.3, fortunes=1:1.99.1-7.3 "
                                           "have sha256"):
        fetch_corpus("fortunes", tmp_path)
    assert not (tmp_path / "text").exists() or not any((tmp_path / "text").iterdir())


def test_a_missing_package_names_itself_and_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = Package("cfbench-no-such-package", "1.0")
    spec = dataclasses.replace(CORPORA["fortunes"], packages=(missing,))
    monkeypatch.setitem(CORPORA, "fortunes", spec)
    with pytest.raises(CfbenchError, match="cfbench-no-such-package=1.0") as e:
        fetch_corpus("fortunes", tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "text").exists()


def test_fetch_replaces_a_corrupt_corpus(fortunes_root: Path, tmp_path: Path) -> None:
    root = _copy_fortunes(fortunes_root, tmp_path)
    (root / "text/fortunes/documents.jsonl").write_bytes(b"")
    target = fetch_corpus("fortunes", root)
    assert load_corpus("fortunes", root).sha256 == CORPORA["fortunes"].sha256
    assert json.loads((target / "manifest.json").read_text())["documents"] == FORTUNES_DOCUMENTS
    assert sorted(p.name for p in (root / "text").iterdir()) == ["fortunes"]  # no partial left


def test_split_is_deterministic_by_whole_documents(fortunes_root: Path) -> None:
    documents = load_corpus("fortunes", fortunes_root).documents
    split = split_documents(documents, heldout_fraction=0.1, seed=0)
    assert split == split_documents(documents, heldout_fraction=0.1, seed=0)
    # Every document lands whole on exactly one side; each side keeps corpus order.
    position = {d.id: i for i, d in enumerate(documents)}
    assert sorted(split.train + split.heldout, key=lambda d: position[d.id]) == list(documents)
    assert {d.id for d in split.train}.isdisjoint({d.id for d in split.heldout})
    for side in (split.train, split.heldout):
        assert [position[d.id] for d in side] == sorted(position[d.id] for d in side)
    assert 0.08 < len(split.heldout) / len(documents) < 0.12
    other = split_documents(documents, heldout_fraction=0.1, seed=1)
    assert other.heldout != split.heldout
    # A document's side depends on its id alone: dropping others does not move it.
    half = split_documents(documents[::2], heldout_fraction=0.1, seed=0)
    assert set(half.heldout) == set(split.heldout) & set(documents[::2])


def test_split_refuses_a_degenerate_request() -> None:
    docs = [Document(str(i), "x") for i in range(3)]
    with pytest.raises(CfbenchError, match="heldout_fraction"):
        split_documents(docs, heldout_fraction=1.0)
    with pytest.raises(CfbenchError, match="one side empty"):
        split_documents(docs[:1], heldout_fraction=0.1)


@pytest.mark.parametrize("name", ["bible-kjv", "python-docs", "python-code", "gcide"])
def test_every_corpus_fetches_and_verifies(name: str, fortunes_root: Path) -> None:
    fetch_corpus(name, fortunes_root)
    corpus = load_corpus(name, fortunes_root)
    assert corpus.manifest["sha256"] == CORPORA[name].sha256
    assert corpus.manifest["packages"] == [dataclasses.asdict(p) for p in CORPORA[name].packages]
    assert len(corpus.documents) == corpus.manifest["documents"] > 100


def test_cli_fetches_every_corpus_by_name(fortunes_root: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cfbench import cli

    assert tuple(CORPORA) == cli.TEXT_CORPORA
    assert cli.main(["data", "fetch", "fortunes", "--data-root", str(fortunes_root)]) == 0
    assert str(fortunes_root / "text/fortunes") in capsys.readouterr().out
