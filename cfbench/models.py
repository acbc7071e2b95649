"""Backbones, built from a short spec string such as ``mlp:400,400``.

The spec is part of the protocol (and so of the run id); ``--model`` overrides it.
"""

from __future__ import annotations

import math

from torch import nn

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
    raise CfbenchError(f"unknown model '{spec}'; available: mlp:W1,W2,... (e.g. mlp:400,400)")
