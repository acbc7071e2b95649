"""The tier-0 language model: textgenrnn's pretrained character-level LSTM, in PyTorch: its
weights, its vocabulary and its windows of text.

The architecture (`cfbench.models.TextgenrnnLM`) is textgenrnn 2.0.0's ``textgenrnn_model``
(model.py, AttentionWeightedAverage.py) with its default configuration: a window of the previous
40 symbols (left-padded with index 0) -> embedding (465 x 100) -> two stacked 128-unit LSTMs ->
the embedding and both LSTMs' outputs concatenated per step (356 features) -> attention over the
steps (one weight per feature, a softmax across steps, a weighted average) -> dense layer to 465
symbols. Every window starts from a zero LSTM state, as in textgenrnn's training, so the model
scores the next character of a text from at most 40 previous symbols. Index 0 is padding; text
starts with the ``<s>`` meta token.

The weights file was written by Keras 2.1.5 from CuDNNLSTM layers, so its LSTM tensors are in
cuDNN's canonical layout, not Keras's: each gate's input block holds the bytes of a
(units x inputs) row-major matrix under a (inputs x units) label, each gate's recurrent block is
already (units x units) as cuDNN multiplies it, and there are two bias vectors (cuDNN adds
an input and a recurrent bias). The gate order is i, f, c(g), o in Keras, cuDNN and PyTorch
alike, so no gate is reordered; the two biases map to PyTorch's ``bias_ih`` and ``bias_hh``.
This is the conversion Keras itself applies when loading CuDNNLSTM weights into an LSTM. A
plain transpose of the whole kernels instead gives a model that is wrong by more than an order
of magnitude in bits per character (tests/test_charlm.py pins both).

Text is encoded as textgenrnn's training did: characters outside the vocabulary are dropped.
The vocabulary has no line break or tab, so every whitespace character reads as a space first.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cfbench.data.text import sample_spans
from cfbench.data.textgenrnn import textgenrnn_files
from cfbench.errors import CfbenchError
from cfbench.models import TextgenrnnLM

MAX_LENGTH = 40
META_TOKEN = "<s>"


class CharVocab:
    """textgenrnn's symbol table: index 0 is padding, ``<s>`` starts every text."""

    def __init__(self, index: dict[str, int]) -> None:
        self.index = dict(index)
        self.start = self.index[META_TOKEN]
        self.size = len(self.index) + 1

    @classmethod
    def load(cls, path: Path) -> CharVocab:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def encode(self, text: str) -> list[int]:
        """The symbols of `text`, after ``<s>``: whitespace as a space, unknown characters
        dropped."""
        index = self.index
        return [self.start] + [index[c] for c in re.sub(r"\s", " ", text) if c in index]


def read_keras_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of the Keras weights file as stored, keyed ``layer/weight`` (e.g.
    ``rnn_1/kernel``), read with h5py alone."""
    try:
        import h5py
    except ImportError:
        raise CfbenchError("reading the tier-0 weights needs h5py: pip install 'cfbench[lm]'") \
            from None
    arrays = {}
    with h5py.File(path, "r") as f:
        for layer in f.attrs["layer_names"]:
            group = f[layer.decode()]
            for weight in group.attrs["weight_names"]:
                key = weight.decode().removesuffix(":0")
                layer_name, name = key.split("/")
                arrays[f"{layer_name}/{name.removeprefix(layer_name + '_')}"] = np.asarray(
                    group[key + ":0"])
    return arrays


def _cudnn_gates(kernel: np.ndarray, recurrent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's (4 units x inputs) and (4 units x units) matrices from CuDNNLSTM's blocks."""
    inputs, units = kernel.shape[0], recurrent.shape[0]
    w_ih = [np.ascontiguousarray(block).reshape(units, inputs) for block in np.hsplit(kernel, 4)]
    w_hh = np.hsplit(recurrent, 4)
    return np.concatenate(w_ih), np.concatenate(w_hh)


def state_dict_from_keras(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """`TextgenrnnLM`'s state dict from textgenrnn's arrays (see the module's docstring)."""
    state = {"features.embedding.weight": arrays["embedding/embeddings"],
             "features.attention.weight": arrays["attention/W"].T,
             "head.weight": arrays["output/kernel"].T,
             "head.bias": arrays["output/bias"]}
    for layer in ("rnn_1", "rnn_2"):
        w_ih, w_hh = _cudnn_gates(arrays[f"{layer}/kernel"], arrays[f"{layer}/recurrent_kernel"])
        bias_ih, bias_hh = np.split(arrays[f"{layer}/bias"], 2)
        state.update({f"features.{layer}.weight_ih_l0": w_ih,
                      f"features.{layer}.weight_hh_l0": w_hh,
                      f"features.{layer}.bias_ih_l0": bias_ih,
                      f"features.{layer}.bias_hh_l0": bias_hh})
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in state.items()}


def pretrained_state(root: Path) -> dict[str, torch.Tensor]:
    """`TextgenrnnLM`'s pretrained state dict from the data root (verified files)."""
    return state_dict_from_keras(read_keras_weights(textgenrnn_files(root)[0]))


def load_vocab(root: Path) -> CharVocab:
    """textgenrnn's vocabulary from the data root (verified files)."""
    return CharVocab.load(textgenrnn_files(root)[1])


def load_textgenrnn(root: Path) -> tuple[TextgenrnnLM, CharVocab]:
    """The pretrained tier-0 model and its vocabulary."""
    vocab = load_vocab(root)
    model = TextgenrnnLM(symbols=vocab.size)
    model.load_state_dict(pretrained_state(root))
    return model, vocab


def next_char_windows(symbols: list[int], max_length: int = MAX_LENGTH
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs N x max_length, targets N): for each symbol after the first, the up to
    `max_length` symbols before it, left-padded with 0 (textgenrnn's training windows)."""
    padded = np.concatenate([np.zeros(max_length, dtype=np.int64),
                             np.asarray(symbols, dtype=np.int64)])
    n = len(symbols) - 1
    if n < 1:
        return torch.zeros(0, max_length, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    starts = np.arange(1, n + 1)
    inputs = np.lib.stride_tricks.sliding_window_view(padded, max_length)[starts]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(padded[max_length + 1:])


def sample_windows(texts: Sequence[str], vocab: CharVocab, characters: int, span: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows N x 40 as int16, next symbols N) for up to `characters` targets, cut from the
    spans of ``cfbench.data.text.sample_spans``. Every target keeps its own context (the 40
    symbols before it in its text), so a span cut from the middle of a document reads as it
    does in place."""
    windows, targets = [], []
    for symbols, start, length in sample_spans(texts, vocab.encode, characters, span, generator):
        # Only the span and the MAX_LENGTH symbols before it, not the whole document.
        first = max(0, start + 1 - MAX_LENGTH)
        inputs, nexts = next_char_windows(symbols[first:start + length + 1])
        windows.append(inputs[-length:].to(torch.int16))
        targets.append(nexts[-length:])
    if not targets:
        raise CfbenchError("no in-vocabulary characters to make windows from")
    return torch.cat(windows), torch.cat(targets)


@torch.no_grad()
def bits_per_character(model: nn.Module, vocab: CharVocab, texts: Iterable[str],
                       batch_size: int = 1024) -> float:
    """Mean -log2 p(next character) over every in-vocabulary character of `texts`, each text
    scored on its own from ``<s>``."""
    model.eval()
    total, count = 0.0, 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score() -> float:
        inputs = torch.cat([windows for windows, _ in pending])
        targets = torch.cat([targets for _, targets in pending])
        pending.clear()
        return sum(nn.functional.cross_entropy(model(inputs[i:i + batch_size]),
                                               targets[i:i + batch_size], reduction="sum").item()
                   for i in range(0, len(targets), batch_size))

    for text in texts:
        pending.append(next_char_windows(vocab.encode(text)))
        count += len(pending[-1][1])
        if sum(len(t) for _, t in pending) >= batch_size:
            total += score()
    if pending:
        total += score()
    if count == 0:
        raise CfbenchError("no in-vocabulary characters to score")
    return total / count / math.log(2)
