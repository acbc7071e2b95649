"""Run configurations and run records: the JSON a run leaves behind.

A run id is the hash of the canonical configuration (scenario, setting, strategy with every
hyperparameter resolved, both seeds, the full protocol, the device), so the same experiment always
gets the same id and a finished run can be recognised and skipped.

Records are strict JSON (no NaN or Infinity: an undefined number is null) and are checked field by
field whenever they are read, from a file or the store (`parse_record`): a record someone edited,
truncated or crafted is one error naming its source and the field, never a traceback later on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cfbench.errors import CfbenchError
from cfbench.scenario import Protocol

SCHEMA_VERSION = 1
RUN_ID = re.compile(r"[0-9a-f]{16}")
RUN_ID_PREFIX = re.compile(r"[0-9a-f]{1,16}")
STATUSES = ("ok", "failed", "interrupted")
DEFAULT_OUT = Path("results") / "runs"


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result. Two seeds are kept apart on purpose:
    `scenario_seed` fixes the task sequence (class order, permutations), `seed` the training
    (initialisation, minibatch order, a strategy's own sampling)."""

    scenario: str
    setting: str
    strategy: str
    hparams: dict[str, dict[str, Any]]
    scenario_options: dict[str, Any]
    scenario_seed: int
    seed: int
    protocol: Protocol
    device: str
    validation: dict[str, Any] | None = None
    """None: the scenario's own test split. Otherwise the arguments of
    `cfbench.validation.validation_split` (fraction, seed, tasks): the run trains on the rest of
    each task's training data and is evaluated on a held-out part of it (`cfbench tune`)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["protocol"] = self.protocol.to_dict()
        if self.validation is None:
            del d["validation"]  # absent, not null: ids of runs on the test split are unchanged
        return d

    @property
    def run_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(**{**d, "protocol": Protocol(**d["protocol"])})


@dataclass
class RunRecord:
    """The outcome of one run (schema version 1). R has T+1 rows of scores in [0, 1] (accuracy
    for classification)."""

    run_id: str
    config: dict[str, Any]
    status: str = "ok"
    """One of STATUSES: "ok", "failed" (error says why: an exception, a non-finite loss, a
    timeout, a crashed worker) or "interrupted" (stopped by Ctrl-C; a resumed sweep reruns it)."""
    error: str | None = None
    traceback: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    R: list[list[float]] = field(default_factory=list)
    matrices: dict[str, list[list[float]]] = field(default_factory=dict)
    """Measurements shaped like R that the scenario's objective keeps beside it (a language
    model's held-out loss in nats per token); none for classification."""
    metrics: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float | int | None] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    command: str | None = None
    """The command line that produced the run, when it came from the CLI."""
    strategy_log: dict[str, Any] = field(default_factory=dict)
    """What the strategy reported about the run (e.g. where early stopping ended each task)."""
    selection: dict[str, Any] | None = None
    """How the hyperparameters were chosen, when `cfbench tune` chose them (protocol, split,
    seeds, criterion, score). Not part of the config: it does not change the result."""
    schema_version: int = SCHEMA_VERSION

    def to_json(self, indent: int | None = 1) -> str:
        # NaN and infinities are not JSON: an undefined number (a diverged run's) is null.
        return json.dumps(_finite(dataclasses.asdict(self)), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any, source: str = "run record") -> RunRecord:
        """The record `d` holds, every field checked (null numbers read as NaN); a one-line
        CfbenchError naming `source` and the field if it is not a schema-1 record."""
        try:
            return cls(**_checked(d))
        except _Invalid as exc:
            raise CfbenchError(f"{source}: {exc}") from None


class _Invalid(Exception):
    """A record that is not as schema 1 has it; the message names the field."""


_FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))
_CONFIG = {"scenario": str, "setting": str, "strategy": str, "device": str, "seed": int,
           "scenario_seed": int, "hparams": dict, "scenario_options": dict, "protocol": dict}
_SELECTION = {"by": str, "criterion": str, "candidates": int, "chosen": dict,
              "validation_acc": float, "tuning_seeds": list, "validation": dict}
_JSON = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "an integer",
         float: "a number"}
"""What each Python type read from JSON is called in an error."""


def _kind(value: Any) -> str:
    """How a JSON value is described in an error: its JSON type and (briefly) the value."""
    if value is None:
        return "null"
    shown = repr(value)
    return (f"{_JSON.get(type(value), type(value).__name__)} "
            f"{shown if len(shown) <= 40 else shown[:37] + '...'}")


def _bad(where: str, expected: str, value: Any) -> NoReturn:
    raise _Invalid(f"field '{where}' must be {expected}, got {_kind(value)}")


def _is(value: Any, kind: type) -> bool:
    """JSON typing: a boolean is not a number; a float is any finite number."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        try:
            return isinstance(value, int | float) and math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            return False
    return isinstance(value, kind)


def _number_or_null(value: Any) -> bool:
    return value is None or _is(value, float)


def _rows(value: Any, where: str, scores: bool) -> list[list[float]]:
    """A matrix shaped like R: a list of equally long rows of numbers or null (read as NaN);
    `scores`: each in [0, 1]."""
    entries = "scores in [0, 1] or null" if scores else "numbers or null"
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        _bad(where, f"a list of rows of {entries}", value)
    for t, row in enumerate(value):
        if len(row) != len(value[0]):
            raise _Invalid(f"field '{where}' is ragged: row {t} has {len(row)} entries, row 0 "
                           f"has {len(value[0])}")
        for v in row:
            if not _number_or_null(v) or (scores and v is not None and not 0 <= v <= 1):
                raise _Invalid(f"field '{where}' row {t} must hold {entries}, got {_kind(v)}")
    return [[math.nan if v is None else float(v) for v in row] for row in value]


def _typed(node: Any, where: str, spec: dict[str, type], required: bool = True) -> None:
    if not isinstance(node, dict):
        _bad(where, "an object", node)
    for key, kind in spec.items():
        name = f"{where}.{key}" if where else key
        if key not in node:
            if required:
                raise _Invalid(f"field '{name}' is missing")
        elif not _is(node[key], kind):
            _bad(name, _JSON[kind], node[key])


def _checked(d: Any) -> dict[str, Any]:
    """The keyword arguments of the RunRecord `d` holds (the one description of schema 1), or
    `_Invalid` naming the first field that is not as the schema has it."""
    if not isinstance(d, dict):
        raise _Invalid(f"not a run record: expected a JSON object, got {_kind(d)}")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise _Invalid(f"run record schema {d.get('schema_version')!r} is not supported (this "
                       f"cfbench reads {SCHEMA_VERSION})")
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise _Invalid(f"unknown field {unknown[0]!r}")
    for key in ("run_id", "config"):
        if key not in d:
            raise _Invalid(f"field '{key}' is missing")
    if not (isinstance(d["run_id"], str) and RUN_ID.fullmatch(d["run_id"])):
        _bad("run_id", "16 hex digits", d["run_id"])
    config = d["config"]
    _typed(config, "config", _CONFIG)
    unknown = sorted(set(config) - {*_CONFIG, "validation"})
    if unknown:
        raise _Invalid(f"unknown field 'config.{unknown[0]}'")
    if not all(isinstance(v, dict) for v in config["hparams"].values()):
        _bad("config.hparams", "an object of objects (strategy -> values)", config["hparams"])
    if config.get("validation") is not None and not isinstance(config["validation"], dict):
        _bad("config.validation", "an object or null", config["validation"])
    if d.get("status", "ok") not in STATUSES:
        _bad("status", " or ".join(STATUSES), d["status"])
    _typed(d, "", {"started_at": str, "finished_at": str, "env": dict, "strategy_log": dict},
           required=False)
    for key, value in d.get("env", {}).items():  # what `environment` writes: tables join it
        if value is not None and not _is(value, int if key == "threads" else str):
            _bad(f"env.{key}", "an integer or null" if key == "threads" else "text or null",
                 value)
    for key in ("error", "traceback", "command"):
        if d.get(key) is not None and not isinstance(d[key], str):
            _bad(key, "text or null", d[key])
    tasks = d.get("tasks", [])
    if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        _bad("tasks", "a list of objects with a text 'name'", tasks)
    R = _rows(d.get("R", []), "R", scores=True)
    width, finished = (len(R[0]) if R else 0), d.get("status", "ok") == "ok"
    if (R or finished) and not (width >= 1 and (len(R) == width + 1 if finished
                                                else len(R) <= width + 1)):
        raise _Invalid(f"field 'R' must have T+1 rows of T >= 1 scores (fewer rows for a run "
                       f"that did not finish), got {len(R)} rows of {width}")
    matrices = d.get("matrices", {})
    if not isinstance(matrices, dict):
        _bad("matrices", "an object of matrices shaped like R", matrices)
    matrices = {name: _rows(m, f"matrices.{name}", scores=False) for name, m in matrices.items()}
    for name, m in matrices.items():
        if [len(row) for row in m] != [len(row) for row in R]:
            raise _Invalid(f"field 'matrices.{name}' is not shaped like R")
    for key in ("metrics", "cost"):
        values = d.get(key, {})
        if not isinstance(values, dict) or not all(map(_number_or_null, values.values())):
            _bad(key, "an object of numbers or null", values)
    if d.get("selection") is not None:
        _typed(d["selection"], "selection", _SELECTION)
        _typed(d["selection"]["validation"], "selection.validation",
               {"fraction": float, "seed": int})
    metrics = {k: math.nan if v is None else v for k, v in d.get("metrics", {}).items()}
    return {**d, "R": R, "matrices": matrices, "metrics": metrics}


def write_record(record: RunRecord, out_dir: Path) -> Path:
    """Write ``out_dir/<run_id>.json`` atomically: a reader never sees a partial file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{record.run_id}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{record.run_id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(record.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_record(text: str | bytes, source: str) -> RunRecord:
    """The run record in the JSON `text`, checked (`RunRecord.from_dict`); `source` (a file,
    a store's row) names it in the one-line error."""
    def non_standard(name: str) -> NoReturn:
        raise ValueError(f"{name} is not JSON (an undefined number is written as null)")

    try:
        d = json.loads(text, parse_constant=non_standard)
    except UnicodeDecodeError as exc:
        raise CfbenchError(f"{source}: not a run record: not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise CfbenchError(f"{source}: not a run record: not JSON ({exc})") from None
    return RunRecord.from_dict(d, source)


def read_record(path: Path) -> RunRecord:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CfbenchError(f"cannot read run record {path}: {exc.strerror or exc}") from None
    return parse_record(text, str(path))


def collect(loads: Iterable[Callable[[], RunRecord]],
            on_bad: Callable[[CfbenchError], None] | None = None) -> list[RunRecord]:
    """The records `loads` read. A bad one is an error, or, given `on_bad` (`--skip-bad`),
    is passed to it and left out: a leaderboard over a thousand records should not be hostage
    to one a user chose to skip."""
    records = []
    for load in loads:
        try:
            records.append(load())
        except CfbenchError as exc:
            if on_bad is None:
                raise
            on_bad(exc)
    return records


def read_records(directory: Path, on_bad: Callable[[CfbenchError], None] | None = None
                 ) -> list[RunRecord]:
    """Every run record in `directory` (files named <run id>.json; other files are not runs);
    `on_bad` as in `collect`."""
    if not directory.is_dir():
        raise CfbenchError(f"no run records in {directory}: the directory does not exist")
    paths = [p for p in sorted(directory.glob("*.json")) if RUN_ID.fullmatch(p.stem)]
    return collect((functools.partial(read_record, p) for p in paths), on_bad)


def check_run_id(run_id: str) -> str:
    """`run_id` if it is a run id or a prefix of one (so it can name no other file and match
    no pattern); a one-line CfbenchError otherwise."""
    if not RUN_ID_PREFIX.fullmatch(run_id):
        raise CfbenchError(f"bad run id {run_id!r}: a run id is 16 hex digits (0-9, a-f); a "
                           "unique prefix is enough")
    return run_id


def find_record(run_id: str, directory: Path) -> RunRecord:
    """The record whose id starts with `run_id` (a unique prefix is enough)."""
    check_run_id(run_id)
    matches = [p for p in sorted(directory.glob(f"{run_id}*.json")) if RUN_ID.fullmatch(p.stem)]
    if len(matches) != 1:
        problem = "no run" if not matches else f"{len(matches)} runs"
        raise CfbenchError(f"{problem} with id '{run_id}' in {directory}; pass --out DIR if the "
                           "records are elsewhere")
    return read_record(matches[0])


@functools.cache
def _git_sha() -> str | None:
    """The commit cfbench runs from, with "-dirty" when its code (the installed packages and
    pyproject.toml, not results or docs) differs from that commit."""
    here = Path(__file__).parent
    code = [str(here), str(here.parent / "strategies"), str(here.parent / "scenarios"),
            str(here.parent / "pyproject.toml")]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *code], cwd=here, capture_output=True, text=True,
                               timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty.strip() else "")) or None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """Where a run happened: costs are only comparable on the same hardware and versions."""
    import torch

    from cfbench import __version__

    name = (torch.cuda.get_device_name(torch.device(device))
            if device.startswith("cuda") else _cpu_name())
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cfbench": __version__, "git_sha": _git_sha(), "device": device,
            "device_name": name, "threads": torch.get_num_threads(),
            "platform": platform.platform()}
