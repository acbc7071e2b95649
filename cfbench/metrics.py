"""Continual-learning metrics as pure functions of the accuracy matrix R.

R has T+1 rows and T columns, values in [0, 1]: row 0 is measured before any training, row t
after training task t; column i is task i (1-based in the formulas, 0-based in the array).
Undefined values (T = 1, a zero denominator) are NaN, never an exception.

Conventions, to compare with numbers other frameworks publish:
- "cfbench" (default): as above.
- "gem": GEM's code (Lopez-Paz & Ranzato) averages BWT and FWT over all T tasks, the terms it
  cannot define counted as 0, i.e. it divides by T instead of T-1.
- "mammoth": Mammoth's forgetting takes the max over rows 1..T, the last one included.

- ACC = mean_i R[T,i]                                 average final accuracy
- LA  = mean_i R[i,i]                                 learning accuracy (plasticity)
- BWT = 1/(T-1) sum_{i<T} (R[T,i] - R[i,i])           Lopez-Paz & Ranzato 2017
- FWT = 1/(T-1) sum_{i>=2} (R[i-1,i] - R[0,i])        same paper; row 0 is the baseline b_i
- FM  = mean_{i<T} (max_{t in 1..T-1} R[t,i] - R[T,i])  Chaudhry et al. 2018
- REM = mean_{i<T} 100 * R[T,i] / R[i,i]              % of each old task's accuracy kept
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = ("acc", "la", "bwt", "fwt", "fm", "rem")
CONVENTIONS = ("cfbench", "gem", "mammoth")


def _matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] + 1 or m.shape[1] < 1:
        raise ValueError(f"R must have T+1 rows and T >= 1 columns, got shape {m.shape}")
    return m


def acc(R) -> float:
    m = _matrix(R)
    return float(m[-1].mean())


def learning_accuracy(R) -> float:
    m = _matrix(R)
    T = m.shape[1]
    return float(np.mean([m[i, i - 1] for i in range(1, T + 1)]))


def bwt(R, convention: str = "cfbench") -> float:
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return math.nan
    total = sum(m[T, i - 1] - m[i, i - 1] for i in range(1, T))
    return float(total / (T if convention == "gem" else T - 1))


def fwt(R, convention: str = "cfbench") -> float:
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return math.nan
    # Task i sits in column i-1; R[i-1, i] is its accuracy just before it is trained.
    total = sum(m[i - 1, i - 1] - m[0, i - 1] for i in range(2, T + 1))
    return float(total / (T if convention == "gem" else T - 1))


def forgetting(R, convention: str = "cfbench") -> float:
    m = _matrix(R)
    T = m.shape[1]
    if T < 2:
        return math.nan
    last = T + 1 if convention == "mammoth" else T  # rows 1..T, or 1..T-1
    return float(np.mean([m[1:last, i - 1].max() - m[T, i - 1] for i in range(1, T)]))


def remembering(R) -> float:
    """Mean over old tasks of 100 * R[T,i] / R[i,i]; tasks never learned (R[i,i]=0) are left out."""
    m = _matrix(R)
    T = m.shape[1]
    kept = [100.0 * m[T, i - 1] / m[i, i - 1] for i in range(1, T) if m[i, i - 1] > 0]
    return float(np.mean(kept)) if kept else math.nan


def transfer_remembering(R) -> float:
    """REM of a transfer scenario, 100 * R[T,1] / R[1,1]: the share of the source's accuracy
    (task 1, learned before the sequence; row 1 is the pretrained model) kept at the end."""
    m = _matrix(R)
    return 100.0 * float(m[-1, 0] / m[1, 0]) if m[1, 0] > 0 else math.nan


def target_accuracy(R) -> float:
    """ACC over the downstream tasks of a transfer scenario (every task but the source, task 1):
    what fine-tuning was for."""
    m = _matrix(R)
    return float(m[-1, 1:].mean()) if m.shape[1] > 1 else math.nan


LANGUAGE_METRICS = ("source_ppl_before", "source_ppl_after", "source_logppl_increase",
                    "target_ppl_before", "target_ppl_after")


def language_metrics(loss) -> dict[str, float]:
    """What fine-tuning a pretrained language model did, from a transfer scenario's matrix of
    held-out loss (nats per token, shaped like R; column 1 is the source): the source's
    perplexity before (row 1, the pretrained model) and after the sequence, the increase in its
    log-perplexity (the forgetting measure of Jin & Ren 2024 and Kalajdzievski 2024; > 0 means
    forgotten), and the downstream tasks' perplexity (exp of their mean loss) before and after.
    """
    m = _matrix(loss)
    targets = m[:, 1:].mean(axis=1) if m.shape[1] > 1 else np.full(len(m), math.nan)
    return {"source_ppl_before": perplexity(m[1, 0]), "source_ppl_after": perplexity(m[-1, 0]),
            "source_logppl_increase": float(m[-1, 0] - m[1, 0]),
            "target_ppl_before": perplexity(targets[1]),
            "target_ppl_after": perplexity(targets[-1])}


def perplexity(nats: float) -> float:
    """exp(loss in nats per token); infinite for a loss past what a float can exponentiate (a
    diverged run)."""
    return math.exp(nats) if nats < 709.0 else math.inf


def all_metrics(R, convention: str = "cfbench") -> dict[str, float]:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; use one of {CONVENTIONS}")
    return {"acc": acc(R), "la": learning_accuracy(R), "bwt": bwt(R, convention),
            "fwt": fwt(R, convention), "fm": forgetting(R, convention), "rem": remembering(R)}
