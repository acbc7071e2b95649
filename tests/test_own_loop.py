"""The README's example: strategies' hooks driven by a plain PyTorch loop, no cfbench trainer."""

from __future__ import annotations

from pathlib import Path

import torch


def readme_loop() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return readme.split("```python\n# own_loop.py\n", 1)[1].split("```", 1)[0]


def run_loop(code: str) -> dict:
    namespace: dict = {"__name__": "own_loop"}
    exec(compile(code, "own_loop.py", "exec"), namespace)  # noqa: S102 - the README's code
    return namespace


def test_readme_loop_keeps_old_classes_that_plain_fine_tuning_forgets():
    code = readme_loop()
    protected = run_loop(code)
    naive = run_loop(code.replace(
        'make_strategy("ewc+replay", "class", {"ewc": {"lam": 100}, "replay": {"memory": 200}})',
        'make_strategy("naive", "class")'))
    # Class-incremental: fine-tuning predicts only the last task's classes (about 20 %); the
    # hooks' replay keeps the earlier ones.
    assert sum(naive["accuracy"]) / 5 < 0.3
    assert sum(protected["accuracy"]) / 5 > sum(naive["accuracy"]) / 5 + 0.4
    assert protected["strategy"].state_bytes() > 0
    assert isinstance(protected["model"], torch.nn.Module)
