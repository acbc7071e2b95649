"""The sweep file's schema: `load_sweep` reads a YAML sweep file and checks it.

Unknown keys, unknown names, empty grids and wrong types are one error naming the file, the line
and the key, before anything is planned. A list anywhere a value is expected (a hyperparameter, a
protocol field, a scenario option) is a grid axis; `cfbench.sweep.plan` expands the axes. A
tuple-valued hyperparameter is written as a nested list or a comma string. See the README's
"Sweeps" section for the format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cfbench import registry
from cfbench.errors import CfbenchError
from cfbench.protocol import PER_SEED, Protocol, protocol_value
from cfbench.trackers import TRACKERS

DEFAULT_DIR = Path("results") / "sweeps"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
KEYS = ("name", "scenarios", "settings", "strategies", "seeds", "scenario_seed", "protocol",
        "device", "timeout", "resources", "tune", "log")
TUNE_KEYS = ("seeds", "validation", "tasks", "split_seed")


@dataclass(frozen=True)
class TuneSpec:
    """The `tune:` section: seeds to tune on, the validation split, how many tasks it covers."""

    seeds: tuple[int, ...]
    validation: float = 0.2
    tasks: int | None = None
    split_seed: int = 0


@dataclass(frozen=True)
class SweepFile:
    """A checked sweep file. Grids are lists of alternatives; `plan` expands them."""

    path: Path
    name: str
    scenarios: list[tuple[str, dict[str, list[Any]]]]
    settings: list[str] | None
    """None: each run uses every setting its scenario and strategy both support."""
    strategies: list[tuple[str, dict[str, dict[str, list[Any]]]]]
    seeds: tuple[int, ...]
    scenario_seed: int | str = 0
    """The task sequence's seed, or "seed" (`PER_SEED`): each run's training seed."""
    protocol: dict[str, list[Any]] = field(default_factory=dict)
    device: str = "cpu"
    timeout: float | None = None
    cpus: float = 1.0
    gpus: float = 0.0  # per run, for Ray: resources.gpus, else one when the runs use CUDA
    tune: TuneSpec | None = None
    lines: dict[str, int] = field(default_factory=dict)
    """Line of each top-level key and of each scenario and strategy ("strategies.ewc")."""
    log: tuple[str, ...] = ()
    """Experiment trackers each run is logged to (``cfbench.trackers``), besides ``--log``."""

    def default_store(self, suffix: str = "") -> Path:
        return DEFAULT_DIR / f"{self.name}{suffix}.sqlite"


class _Mapping(dict):
    """A YAML mapping that remembers the line of each key."""

    line: int = 0
    lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    """Safe YAML whose mappings remember their lines and reject duplicate keys."""


def _construct_mapping(loader: Any, node: Any) -> _Mapping:
    loader.flatten_mapping(node)
    out = _Mapping()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _Problem(line, f"keys must be text, got {key!r}")
        if key in out:
            raise _Problem(line, f"duplicate key '{key}' (first at line {out.lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Problem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Checker:
    """Builds one-line errors that name the file, the line and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, node: Mapping, key: str | None, where: str, message: str) -> CfbenchError:
        line = getattr(node, "lines", {}).get(key, getattr(node, "line", 0)) if key else \
            getattr(node, "line", 0)
        return CfbenchError(f"{self.path}:{line}: {where}: {message}")

    def mapping(self, parent: Mapping, key: str, where: str, value: Any) -> Mapping:
        if value is None:  # `naive:` with nothing after it: no values
            empty = _Mapping()
            empty.line, empty.lines = getattr(parent, "lines", {}).get(key, 0), {}
            return empty
        if not isinstance(value, Mapping):
            raise self.error(parent, key, where, f"expected a mapping, got {_kind(value)}")
        return value

    def only(self, node: Mapping, allowed: Sequence[str], where: str) -> None:
        for key in node:
            if key not in allowed:
                raise self.error(node, key, f"{where}{key}" if where else key,
                                 f"unknown key; valid: {', '.join(allowed)}")

    def grid(self, parent: Mapping, key: str, where: str, entry: registry.Entry | None = None
             ) -> list[Any]:
        """A value or a list of alternatives -> a non-empty list of alternatives, each a valid
        value of `entry`'s `key` when an entry is given."""
        value = parent[key]
        if isinstance(value, Mapping):
            raise self.error(parent, key, where, "expected a value or a list of values, got a "
                                                 "mapping")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise self.error(parent, key, where, "empty grid: give at least one value")
        for v in values if entry is not None else ():
            try:
                entry.resolve({key: v})
            except CfbenchError as exc:
                raise self.error(parent, key, where, str(exc)) from None
        return values

    def number(self, parent: Mapping, key: str, where: str, *, integer: bool = False,
               minimum: float | None = None, positive: bool = False) -> Any:
        value = parent[key]
        kind = int if integer else (int, float)
        if isinstance(value, str) and not integer:
            with contextlib.suppress(ValueError):  # PyYAML reads 1e-3 (no dot) as text
                value = float(value)
        try:
            finite = math.isfinite(value)
        except (TypeError, OverflowError):  # not a number; an integer beyond a float's range
            finite = integer and isinstance(value, int)
        if isinstance(value, bool) or not isinstance(value, kind) or not finite:
            expected = "an integer" if integer else "a finite number"
            raise self.error(parent, key, where, f"expected {expected}, got {_kind(value)} "
                                                 f"{value!r}")
        if positive and not value > 0:
            raise self.error(parent, key, where, f"must be positive, got {value}")
        if minimum is not None and value < minimum:
            raise self.error(parent, key, where, f"must be at least {minimum}, got {value}")
        return value

    def text(self, parent: Mapping, key: str, where: str) -> str:
        value = parent[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(parent, key, where, f"expected text, got {_kind(value)} {value!r}")
        return value.strip()

    def texts(self, parent: Mapping, key: str, where: str) -> list[str]:
        value = parent[key]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise self.error(parent, key, where, f"expected a name or a list of names, got "
                                                 f"{value!r}")
        if not values:
            raise self.error(parent, key, where, "empty list")
        return values

    def seeds(self, parent: Mapping, key: str, where: str) -> tuple[int, ...]:
        value = parent[key]
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise self.error(parent, key, where, f"a number of seeds must be at least 1, "
                                                     f"got {value}")
            return tuple(range(value))
        if (not isinstance(value, list) or not value
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in value)):
            raise self.error(parent, key, where, f"expected a number of seeds N (0..N-1) or a "
                                                 f"non-empty list of seeds >= 0, got {value!r}")
        if len(set(value)) != len(value):
            raise self.error(parent, key, where, f"seed listed twice in {value}")
        return tuple(value)


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", _Mapping: "a mapping", str: "text",
            bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def load_sweep(path: str | Path) -> SweepFile:
    """Read and check a sweep file: structure, types, names and hyperparameter values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CfbenchError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CfbenchError(f"cannot read sweep file {path}: not UTF-8 text ({exc.reason} at "
                           f"byte {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except _Problem as exc:
        raise CfbenchError(f"{path}:{exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CfbenchError(f"{path}{line}: not valid YAML: {problem}") from None
    check = _Checker(path)
    if not isinstance(raw, Mapping):
        raise CfbenchError(f"{path}: a sweep file is a mapping with keys "
                           f"{', '.join(KEYS)}; got {_kind(raw)}")
    check.only(raw, KEYS, "")
    for key in ("scenarios", "strategies"):
        if key not in raw:
            raise CfbenchError(f"{path}: missing key '{key}'")
    lines = dict(raw.lines)
    name = check.text(raw, "name", "name") if "name" in raw else path.stem
    if not NAME.fullmatch(name):
        raise check.error(raw, "name", "name", f"'{name}' must be letters, digits, '.', '_' or "
                                               "'-' (it names the store file)")
    scenarios = _scenarios(check, raw, lines)
    settings = None
    if "settings" in raw and raw["settings"] != "all":
        settings = check.texts(raw, "settings", "settings")
        for s in settings:
            if s not in registry.SETTINGS:
                raise check.error(raw, "settings", "settings", f"unknown setting '{s}'; use "
                                  f"{', '.join(registry.SETTINGS)} or all")
    strategies = _strategies(check, raw, lines)
    protocol = _protocol(check, raw)
    seeds = check.seeds(raw, "seeds", "seeds") if "seeds" in raw else (0,)
    scenario_seed: int | str = 0
    if raw.get("scenario_seed") == PER_SEED:
        scenario_seed = PER_SEED
    elif "scenario_seed" in raw:
        scenario_seed = check.number(raw, "scenario_seed", "scenario_seed", integer=True)
    device = check.text(raw, "device", "device") if "device" in raw else "cpu"
    timeout = None
    if raw.get("timeout") is not None:
        timeout = float(check.number(raw, "timeout", "timeout", positive=True))
    cpus, gpus = 1.0, None
    if "resources" in raw:
        res = check.mapping(raw, "resources", "resources", raw["resources"])
        check.only(res, ("cpus", "gpus"), "resources.")
        if "cpus" in res:
            cpus = float(check.number(res, "cpus", "resources.cpus", positive=True))
        if "gpus" in res:
            gpus = float(check.number(res, "gpus", "resources.gpus", minimum=0))
    from cfbench.experiment import resolve_device

    try:  # on this machine
        cuda = resolve_device(device).startswith("cuda")
    except CfbenchError as exc:
        raise check.error(raw, "device", "device", str(exc)) from None
    if gpus and not cuda:
        raise CfbenchError(f"{path}:{lines.get('resources', 0)}: resources.gpus is {gpus:g} but "
                           f"the runs use device '{device}'; set device: cuda")
    tune = _tune(check, raw) if "tune" in raw else None
    log = tuple(check.texts(raw, "log", "log")) if "log" in raw else ()
    for tracker in log:
        if tracker not in TRACKERS:
            raise check.error(raw, "log", "log", f"unknown tracker '{tracker}'; use "
                                                 f"{', '.join(TRACKERS)}")
    return SweepFile(path, name, scenarios, settings, strategies, seeds, scenario_seed,
                     protocol, device, timeout, cpus, float(cuda) if gpus is None else gpus, tune,
                     lines, log=log)


def _named_entries(check: _Checker, raw: Mapping, key: str
                   ) -> list[tuple[str, Mapping, str, Any]]:
    """`key: name`, `key: [names]` or `key: {name: {...}}` -> (name, the node and key whose
    line names it, its value)."""
    value = raw[key]
    if isinstance(value, Mapping):
        if not value:
            raise check.error(raw, key, key, "empty: name at least one")
        return [(name, value, name, value[name]) for name in value]
    return [(name, raw, key, None) for name in check.texts(raw, key, key)]


def _scenarios(check: _Checker, raw: Mapping, lines: dict[str, int]
               ) -> list[tuple[str, dict[str, list[Any]]]]:
    out = []
    for name, node, at, value in _named_entries(check, raw, "scenarios"):
        where = f"scenarios.{name}"
        lines[where] = node.lines[at]
        try:
            entry = registry.scenarios.get(name)
        except CfbenchError as exc:
            raise check.error(node, at, where, str(exc)) from None
        options = check.mapping(node, at, where, value)
        out.append((name, {key: check.grid(options, key, f"{where}.{key}", entry)
                           for key in options}))
    return out


def _strategies(check: _Checker, raw: Mapping, lines: dict[str, int]
                ) -> list[tuple[str, dict[str, dict[str, list[Any]]]]]:
    from cfbench.strategy import strategy_names

    out = []
    for spec, node, at, value in _named_entries(check, raw, "strategies"):
        where = f"strategies.{spec}"
        lines[where] = node.lines[at]
        try:
            parts = strategy_names(spec)
        except CfbenchError as exc:
            raise check.error(node, at, where, str(exc)) from None
        given = check.mapping(node, at, where, value)
        if len(parts) == 1:  # ewc: {lam: [..]}
            per_part = {parts[0]: (given, where)}
        else:  # ewc+replay: {ewc: {lam: [..]}, replay: {...}}
            check.only(given, parts, f"{where}.")
            per_part = {p: (check.mapping(given, p, f"{where}.{p}", given[p]), f"{where}.{p}")
                        for p in given}
        out.append((spec, {part: {key: check.grid(hps, key, f"{at}.{key}",
                                                  registry.strategies.get(part)) for key in hps}
                           for part, (hps, at) in per_part.items()}))
    return out


def _protocol(check: _Checker, raw: Mapping) -> dict[str, list[Any]]:
    if "protocol" not in raw:
        return {}
    node = check.mapping(raw, "protocol", "protocol", raw["protocol"])
    check.only(node, [f.name for f in dataclasses.fields(Protocol)], "protocol.")
    grid = {}
    for key in node:
        grid[key] = []
        for v in check.grid(node, key, f"protocol.{key}"):
            try:
                grid[key].append(protocol_value(key, v))
            except CfbenchError as exc:
                raise check.error(node, key, f"protocol.{key}", str(exc)) from None
    return grid


def _tune(check: _Checker, raw: Mapping) -> TuneSpec:
    node = check.mapping(raw, "tune", "tune", raw["tune"])
    check.only(node, TUNE_KEYS, "tune.")
    if "seeds" not in node:
        raise check.error(raw, "tune", "tune", "missing 'seeds': the seeds to tune on, disjoint "
                                               "from the seeds reported")
    seeds = check.seeds(node, "seeds", "tune.seeds")
    fraction = 0.2
    if "validation" in node:
        fraction = float(check.number(node, "validation", "tune.validation", positive=True))
        if fraction >= 1:
            raise check.error(node, "validation", "tune.validation", "the fraction of each "
                              f"class's training data held out must be below 1, got {fraction}")
    tasks = None
    if node.get("tasks") not in (None, "all"):
        tasks = check.number(node, "tasks", "tune.tasks", integer=True, minimum=1)
    split_seed = (check.number(node, "split_seed", "tune.split_seed", integer=True)
                  if "split_seed" in node else 0)
    return TuneSpec(seeds, fraction, tasks, split_seed)
