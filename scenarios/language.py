"""Fine-tuning a pretrained language model on text domains, and what it forgets of English.

The source (task 0) is textgenrnn's pretrained character-level LSTM (`cfbench.charlm`) on
general English: held-out documents of the ``fortunes`` corpus, which its pretraining never
saw. R's row 1 is that model before any fine-tuning; the targets are text domains fine-tuned
in sequence (archaic English, technical prose, source code), each a corpus split by document
(`cfbench.data.text.split_documents`). R holds next-character accuracy and the record's
``loss`` matrix the held-out cross-entropy in nats per character, from which the leaderboard
shows the source's perplexity before and after and the targets' perplexity.

There is one setting, "domain": every task predicts the same 465 symbols. Strategies that keep
training data (replay, Fisher estimates, distillation on old inputs) read the source's training
windows, i.e. general English "mixed in", as the literature's replay of pretraining data does.

The option ``lm`` swaps the model (`model_tier`): ``gpt2-gcide``, a byte-level GPT-2 that
cfbench pretrains on a dictionary (tier 1), or ``hf:NAME``, a Hugging Face causal LM (tier 2),
both in ``cfbench.gpt``. Their samples are blocks of tokens with a target at every position,
cut from the same spans of the same documents as tier 0's windows; the symbols are the model's
(256 bytes, or the tokenizer's vocabulary), and the budgets count them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from cfbench import gpt
from cfbench.charlm import load_vocab, pretrained_state, sample_windows
from cfbench.data.text import (
    CORPORA,
    HELDOUT_FRACTION,
    HF_PREFIX,
    SPLIT_SEED,
    load_corpus,
    split_documents,
)
from cfbench.models import TextgenrnnLM
from cfbench.registry import register_scenario
from cfbench.scenario import NextToken, Protocol, Scenario, Source, Task

# Adam, batches of 64 windows, a fixed number of steps per domain: fine-tuning strong enough
# that plain fine-tuning measurably loses general English within the budget (at a third of
# this rate the first few hundred steps lower the source's loss instead: any clean text first
# recalibrates a model pretrained on Reddit), short enough that a run fits a few minutes on
# two cores.
TIER0_PROTOCOL = Protocol(model="textgenrnn", epochs=None, iterations=400, batch_size=64,
                          optimizer="adam", lr=3e-3, eval_batch_size=2048)

# Tiers 1 and 2 (transformers): batches of 16 blocks of 64 tokens, 600 steps per domain (about
# six passes over a domain's default 100,000 training tokens) at tier 1's peak pretraining rate
# (re-warming, as continued pretraining does): tier 1 saw only 4M bytes, so gentle fine-tuning
# on a domain still improves its general English instead of forgetting it. The model spec is
# the scenario's `lm`; a large hub model wants a far smaller --lr.
BLOCK_PROTOCOL = Protocol(model=gpt.TIER1, epochs=None, iterations=600, batch_size=16,
                          optimizer="adam", lr=gpt.LR, eval_batch_size=256)

SOURCE_CORPUS = "fortunes"
DOMAINS = {"bible": "bible-kjv", "docs": "python-docs", "code": "python-code"}
"""Target domains: the name a task gets -> the corpus it is cut from."""
# Documents are held out by a fixed hash (``cfbench.data.text.HELDOUT_FRACTION``,
# ``SPLIT_SEED``; not the scenario seed), so every run of every scenario scores the same held-out
# documents of a corpus, which tier 1's pretraining never read; the scenario seed draws which
# spans of text train and are scored.


def _texts(documents) -> list[str]:
    return [d.text for d in documents]


Sampler = Callable[[Sequence[str], int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""(texts, targets wanted, generator) -> (inputs, targets) cut from spans of the texts."""


@dataclasses.dataclass(frozen=True)
class Tier:
    """What the scenario takes from its model: the protocol, what a sample is, the symbols
    predicted, how text becomes samples, and how the pretrained weights are loaded."""

    protocol: Protocol
    objective: NextToken
    symbols: int
    sample: Sampler
    load: Callable[[nn.Module], None]


def model_tier(lm: str, data_root: Path, span: int) -> Tier:
    """textgenrnn (tier 0): windows of its 40 previous symbols, one next character each;
    ``gpt2-gcide`` (tier 1) and ``hf:NAME`` (tier 2): blocks of `cfbench.gpt.CONTEXT` tokens
    with a target per position. Both are cut from the same spans of the same documents."""
    if lm == "textgenrnn":
        vocab = load_vocab(data_root)
        return Tier(TIER0_PROTOCOL, NextToken(windowed=True), vocab.size,
                    lambda texts, budget, g: sample_windows(texts, vocab, budget, span, g),
                    functools.partial(_load_pretrained, data_root))
    if lm != gpt.TIER1 and not lm.startswith("hf:"):
        raise ValueError(f"lm must be textgenrnn, {gpt.TIER1} or hf:NAME, got {lm!r}")
    gpt.require_pretrained(lm, data_root)
    encode, symbols = gpt.tokenizer(lm)
    # An evaluation batch holds at most 2^24 logits (a large vocabulary's are big).
    evaluation = max(1, min(BLOCK_PROTOCOL.eval_batch_size, 2**24 // (gpt.CONTEXT * symbols)))
    protocol = dataclasses.replace(BLOCK_PROTOCOL, model=lm, eval_batch_size=evaluation)
    return Tier(protocol, NextToken(), symbols,
                lambda texts, budget, g: gpt.sample_blocks(texts, encode, budget, span,
                                                           gpt.CONTEXT, g),
                functools.partial(gpt.load_pretrained, lm, data_root))


def text_task(name: str, corpus: str, data_root: Path, tier: Tier,
              budgets: tuple[int, int, int], generator: torch.Generator) -> Task:
    """A task cut from `corpus`: (train, held-out, validation) budgets of targets; the
    validation split (0: none) comes from training documents that the training spans skip.
    The task's `data` names the corpus, its SHA-256 and the split, for the run record."""
    text = load_corpus(corpus, data_root)
    split = split_documents(text.documents, HELDOUT_FRACTION, SPLIT_SEED)
    train_budget, heldout_budget, val_budget = budgets
    train_texts = _texts(split.train)
    x_val = y_val = None
    if val_budget:
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        cut = max(1, len(order) // 10)
        x_val, y_val = tier.sample([train_texts[i] for i in order[:cut]], val_budget, generator)
        train_texts = [train_texts[i] for i in sorted(order[cut:])]
    x_train, y_train = tier.sample(train_texts, train_budget, generator)
    x_test, y_test = tier.sample(_texts(split.heldout), heldout_budget, generator)
    data = {"corpus": corpus, "sha256": text.sha256,
            "split": {"by": "document", "heldout_fraction": HELDOUT_FRACTION,
                      "seed": SPLIT_SEED, "train_documents": len(split.train),
                      "heldout_documents": len(split.heldout)}}
    return Task(name=name, classes=tuple(range(tier.symbols)), x_train=x_train,
                y_train=y_train, x_test=x_test, y_test=y_test, x_val=x_val, y_val=y_val,
                data=data)


def _load_pretrained(data_root: Path, model: TextgenrnnLM) -> None:
    model.load_state_dict(pretrained_state(data_root))


def language_transfer(name: str, targets: tuple[str, ...], data_root: Path, seed: int,
                      train_chars: int, heldout_chars: int, span: int,
                      lm: str = "textgenrnn", source: str = SOURCE_CORPUS) -> Scenario:
    """General English (the pretrained source, scored on the corpus `source`) -> the domains
    of `targets`, in order, with the model tier `lm` (see `model_tier`). A target or the
    source may be a Hugging Face dataset, ``hf:PATH[:CONFIG]`` (`load_hf_corpus`)."""
    unknown = [t for t in targets if t not in DOMAINS and not t.startswith(HF_PREFIX)]
    if not targets or unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct domains among {', '.join(DOMAINS)} or "
                         f"Hugging Face datasets hf:PATH[:CONFIG], got {targets}")
    if source not in CORPORA and not source.startswith(HF_PREFIX):
        raise ValueError(f"source must be a corpus among {', '.join(CORPORA)} or a Hugging "
                         f"Face dataset hf:PATH[:CONFIG], got {source!r}")
    for option, value in (("train_chars", train_chars), ("heldout_chars", heldout_chars),
                          ("span", span)):
        if value < 1:
            raise ValueError(f"{option} must be positive, got {value}")
    tier = model_tier(lm, data_root, span)
    generator = torch.Generator().manual_seed(seed)
    tasks = [text_task("english" if source == SOURCE_CORPUS else source, source, data_root,
                       tier, (train_chars, heldout_chars, heldout_chars), generator)]
    tasks += [text_task(t, DOMAINS.get(t, t), data_root, tier, (train_chars, heldout_chars, 0),
                        generator) for t in targets]
    return Scenario(name, tasks, tier.protocol, settings=("domain",), objective=tier.objective,
                    source=Source(load=tier.load))


def _register(name: str, default_targets: tuple[str, ...], shift: str) -> None:
    def factory(*, data_root: Path, seed: int, targets: tuple[str, ...] = default_targets,
                train_chars: int = 100_000, heldout_chars: int = 8_000, span: int = 500,
                lm: str = "textgenrnn", source: str = SOURCE_CORPUS) -> Scenario:
        return language_transfer(name, tuple(targets), data_root, seed, train_chars,
                                 heldout_chars, span, lm, source)

    factory.LATER_HPARAMS = ("source",)  # added after runs were recorded: their ids stay

    factory.__doc__ = (
        f"textgenrnn's pretrained character LSTM (source: general English, held-out fortunes) "
        f"fine-tuned on {shift}. Each domain trains on up to `train_chars` characters of its "
        f"training documents and is scored on `heldout_chars` of its held-out ones, in spans "
        f"of at most `span` characters per document drawn by the scenario seed; `targets` "
        f"names the domains ({', '.join(DOMAINS)}) in order. `lm` picks the model: "
        f"textgenrnn (tier 0), {gpt.TIER1} (tier 1: a byte-level GPT-2 pretrained on a "
        f"dictionary; budgets count bytes) or hf:NAME (tier 2: a Hugging Face causal LM; "
        f"budgets count its tokens); tiers 1 and 2 train on blocks of {gpt.CONTEXT} tokens. "
        f"`source` is the corpus general English is scored on ({SOURCE_CORPUS}); it and "
        f"`targets` also take Hugging Face datasets, hf:PATH[:CONFIG] (the 'text' column of "
        f"the train split; e.g. hf:wikitext:wikitext-103-raw-v1, or a local directory).")
    register_scenario(name, family="language", settings=("domain",),
                      reference="textgenrnn (Woolf 2018) fine-tuned; forgetting as in Luo et "
                                "al. 2023, Kalajdzievski 2024")(factory)


_register("lm-general-to-code", ("code",), "Python source code (a far shift)")
_register("lm-general-to-bible", ("bible",), "the King James Bible (archaic English, a mild "
                                             "shift)")
_register("lm-general-to-docs", ("docs",), "Python's documentation (technical English)")
_register("lm-general-to-bible-docs-code", ("bible", "docs", "code"),
          "archaic English, then technical English, then code")
