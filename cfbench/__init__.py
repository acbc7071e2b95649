"""cfbench: a reproducible benchmark suite for catastrophic-forgetting mitigation.

The names a plugin author needs are importable from here; torch is imported only when they are
first used, so ``import cfbench`` and ``cfbench --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "register_strategy": "cfbench.registry",
    "register_scenario": "cfbench.registry",
    "Strategy": "cfbench.strategy",
    "TrainContext": "cfbench.strategy",
    "Batch": "cfbench.strategy",
    "TrainData": "cfbench.strategy",
    "make_strategy": "cfbench.strategy",
    "Scenario": "cfbench.scenario",
    "Task": "cfbench.scenario",
    "Protocol": "cfbench.scenario",
    "CfbenchError": "cfbench.errors",
}

if TYPE_CHECKING:
    from cfbench.errors import CfbenchError
    from cfbench.registry import register_scenario, register_strategy
    from cfbench.scenario import Protocol, Scenario, Task
    from cfbench.strategy import Batch, Strategy, TrainContext, TrainData, make_strategy

__all__ = ["Batch", "CfbenchError", "Protocol", "Scenario", "Strategy", "Task", "TrainContext",
           "TrainData", "__version__", "make_strategy", "register_scenario",
           "register_strategy"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cfbench' has no attribute {name!r}")
