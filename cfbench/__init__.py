"""cfbench: a reproducible benchmark suite for catastrophic-forgetting mitigation.

The names a plugin author needs, and the Python API (`run`, `load_records`, `tabulate`: what
`cfbench run` and `cfbench leaderboard` do, see `cfbench.api`), are importable from here; each
module is imported only when a name is first used, so ``import cfbench`` and ``cfbench --help``
stay fast and free of torch.
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
    "Protocol": "cfbench.protocol",
    "CfbenchError": "cfbench.errors",
    "RunRecord": "cfbench.records",
    "run": "cfbench.api",
    "load_records": "cfbench.api",
    "tabulate": "cfbench.api",
}

if TYPE_CHECKING:
    from cfbench.api import load_records, run, tabulate
    from cfbench.errors import CfbenchError
    from cfbench.protocol import Protocol
    from cfbench.records import RunRecord
    from cfbench.registry import register_scenario, register_strategy
    from cfbench.scenario import Scenario, Task
    from cfbench.strategy import Batch, Strategy, TrainContext, TrainData, make_strategy

__all__ = ["Batch", "CfbenchError", "Protocol", "RunRecord", "Scenario", "Strategy", "Task",
           "TrainContext", "TrainData", "__version__", "load_records", "make_strategy",
           "register_scenario", "register_strategy", "run", "tabulate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cfbench' has no attribute {name!r}")
