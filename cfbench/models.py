"""Backbones, built from a short spec string such as ``mlp:400,400``.

The spec is part of the protocol (and so of the run id); ``--model`` overrides it.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cfbench.errors import CfbenchError


def mlp(in_features: int, hidden: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    """Fully connected ReLU network; the last Linear is the head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def has_running_stats(module: nn.Module) -> bool:
    """Whether training mode would update the module's buffers (batch norm's running stats)."""
    return getattr(module, "running_mean", None) is not None


def hold_in_eval(module: nn.Module) -> RemovableHandle:
    """Run a frozen normalisation layer in eval mode at every forward pass, whatever mode the
    model was put in (the loop sets train mode at each task's start, evaluation restores the
    mode it found): a frozen batch norm must neither normalise with batch statistics nor move
    its running ones. Removing the returned handle releases it."""
    return module.register_forward_pre_hook(_to_eval)


def _to_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(feature extractor, head) of a backbone: strategies that distil features, classify by
    feature means or treat the head apart (iCaRL, L2-SP, LoRA) use this one convention.

    A Sequential's head is its last module; any other backbone exposes ``features`` and
    ``head`` attributes.
    """
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    body, head = getattr(model, "features", None), getattr(model, "head", None)
    if isinstance(body, nn.Module) and isinstance(head, nn.Linear):
        return body, head
    raise CfbenchError(f"{type(model).__name__} has no recognisable head: end a Sequential with "
                       "an nn.Linear, or give the model 'features' and 'head' attributes")


class Backbone(nn.Module):
    """A feature extractor and a linear head: the shape every non-Sequential model here has,
    so that ``split_head`` finds the head."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def reduced_resnet18(in_channels: int, n_outputs: int, nf: int = 20) -> Backbone:
    """The reduced ResNet-18 of the continual-learning literature (Lopez-Paz & Ranzato 2017,
    Chaudhry et al. 2019): ResNet-18's four stages of two basic blocks with nf, 2nf, 4nf, 8nf
    channels (nf=20 instead of 64), a 3x3 stem without pooling, global average pooling."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(nf), nn.ReLU()]
    width = nf
    for stage, stride in enumerate((1, 2, 2, 2)):
        planes = nf * 2 ** stage
        layers += [BasicBlock(width, planes, stride), BasicBlock(planes, planes, 1)]
        width = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Backbone(nn.Sequential(*layers), nn.Linear(width, n_outputs))


def torchvision_resnet18(in_channels: int, n_outputs: int, small_inputs: bool) -> Backbone:
    """torchvision's resnet18 (its parameter names, so its checkpoints load into `features`
    and `head`), or with `small_inputs` the usual 32x32 adaptation: a 3x3 stride-1 stem and no
    max pooling."""
    from torchvision.models import resnet18

    net = resnet18()
    if small_inputs or in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, *((3, 1, 1) if small_inputs else (7, 2, 3)),
                              bias=False)
    if small_inputs:
        net.maxpool = nn.Identity()
    head = nn.Linear(net.fc.in_features, n_outputs)
    net.fc = nn.Identity()
    return Backbone(net, head)


class TokenLSTM(nn.Module):
    """Token ids (B, L) -> the hidden states (B, L, H) of one LSTM layer over their
    embeddings: the features of a small next-token model."""

    def __init__(self, vocabulary: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.embed(x))[0]


class TextgenrnnFeatures(nn.Module):
    """textgenrnn's body: (batch, window) symbol ids -> (batch, 356) attention-pooled features."""

    def __init__(self, symbols: int, embedding_dim: int, units: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(symbols, embedding_dim)
        self.rnn_1 = nn.LSTM(embedding_dim, units, batch_first=True)
        self.rnn_2 = nn.LSTM(units, units, batch_first=True)
        self.attention = nn.Linear(embedding_dim + 2 * units, 1, bias=False)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(windows)
        h1, _ = self.rnn_1(embedded)
        h2, _ = self.rnn_2(h1)
        steps = torch.cat([embedded, h1, h2], dim=-1)
        weights = torch.softmax(self.attention(steps).squeeze(-1), dim=-1)
        return (steps * weights.unsqueeze(-1)).sum(dim=1)


class TextgenrnnLM(Backbone):
    """textgenrnn's network: (batch, window) symbol ids -> (batch, symbols) next-symbol logits.

    An ordinary trainable module whose head (the output layer) is where every strategy looks
    for one (``cfbench.models.split_head``); `load_textgenrnn` fills it with the pretrained
    weights.
    """

    def __init__(self, symbols: int = 465, embedding_dim: int = 100, units: int = 128) -> None:
        super().__init__(TextgenrnnFeatures(symbols, embedding_dim, units),
                         nn.Linear(embedding_dim + 2 * units, symbols))


def initialise(model: nn.Module, init: str) -> nn.Module:
    """`model` with its nn.Linear and nn.Conv2d layers initialised as ``Protocol.init`` says,
    from the global RNG (seeded per run, as building the backbone is); other layers (batch
    norm, embeddings, recurrent layers) keep PyTorch's default. "default" draws nothing, so
    runs recorded before the option existed are unchanged.

    "xavier": weights uniform in +-sqrt(6 / (fan_in + fan_out)), biases zero (Mammoth's
    ``backbone.xavier``; Keras' glorot_uniform default, which Zenke et al.'s SI code uses).
    "trunc-normal": weights N(0, 0.1^2) redrawn outside two standard deviations, biases 0.1
    (TensorFlow's ``truncated_normal(stddev=0.1)`` and ``constant(0.1)`` in the EWC code of
    ariseff/overcoming-catastrophic)."""
    if init == "default":
        return model
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        if init == "xavier":
            nn.init.xavier_uniform_(module.weight)
            bias = 0.0
        else:
            nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2)
            bias = 0.1
        if module.bias is not None:
            nn.init.constant_(module.bias, bias)
    return model


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a module that maps its input's last dimension linearly: an
    ``nn.Linear``, or the ``Conv1D`` of transformers' GPT-2 (a Linear whose weight is stored
    (in, out)); None for any other module. Strategies that adapt linear layers (LoRA) use this
    one test."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    hf = sys.modules.get("transformers.pytorch_utils")  # no model holds a Conv1D before that
    if hf is not None and isinstance(module, hf.Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


MODELS_HELP = ("mlp:W1,W2,... (e.g. mlp:400,400), resnet18-reduced[:NF] (NF=20), "
               "resnet18-cifar, resnet18, lstm:H (token sequences), textgenrnn (windows of 40 "
               "symbols; its pretrained weights come with the lm-* scenarios), gpt2-gcide (a "
               "byte-level GPT-2 pretrained by `cfbench data fetch gpt2-gcide`), hf:NAME (a "
               "causal LM of the Hugging Face hub or a local directory)")


def build_model(spec: str, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Instantiate the backbone named by `spec` for inputs of `input_shape` (no batch dim)."""
    family, _, args = spec.partition(":")
    if family == "mlp":
        try:
            hidden = tuple(int(h) for h in args.split(",") if h.strip())
        except ValueError:
            hidden = (0,)
        if any(h <= 0 for h in hidden):
            raise CfbenchError(f"bad model spec '{spec}': mlp widths must be positive integers, "
                               "e.g. mlp:400,400")
        return mlp(math.prod(input_shape), hidden, n_outputs)
    if family.startswith("resnet18") and len(input_shape) != 3:
        raise CfbenchError(f"model '{spec}' needs image inputs (C x H x W), got shape "
                           f"{input_shape}")
    if family == "lstm":
        if len(input_shape) != 1 or not (args.isdigit() and int(args) > 0):
            raise CfbenchError(f"model '{spec}' needs token sequences (L,) and a positive "
                               "width, e.g. lstm:64")
        # One vocabulary in and out: the outputs are the next token's logits.
        return Backbone(TokenLSTM(n_outputs, int(args)), nn.Linear(int(args), n_outputs))
    if family == "textgenrnn" and not args:
        if len(input_shape) != 1:
            raise CfbenchError(f"model '{spec}' needs windows of symbol ids (L,), got shape "
                               f"{input_shape}")
        return TextgenrnnLM(symbols=n_outputs)
    if spec == "gpt2-gcide" or family == "hf":
        from cfbench import gpt

        return gpt.build(spec, input_shape, n_outputs)
    if family == "resnet18-reduced":
        if args and not (args.isdigit() and int(args) > 0):
            raise CfbenchError(f"bad model spec '{spec}': the width NF must be a positive "
                               "integer, e.g. resnet18-reduced:20")
        return reduced_resnet18(input_shape[0], n_outputs, int(args or 20))
    if family in ("resnet18", "resnet18-cifar") and not args:
        return torchvision_resnet18(input_shape[0], n_outputs, family == "resnet18-cifar")
    raise CfbenchError(f"unknown model '{spec}'; available: {MODELS_HELP}")
