"""Run configurations and run records: the JSON a run leaves behind.

A run id is the hash of the canonical configuration (scenario, setting, strategy with every
hyperparameter resolved, both seeds, the full protocol, the device), so the same experiment always
gets the same id and a finished run can be recognised and skipped.

Records are strict JSON (no NaN or Infinity: an undefined number is null) and are checked field by
field whenever they are read, from a file or the store (`parse_record`), against the published
JSON Schema `cfbench/schema/run-record.schema.json` (the one description of the fields) and R's
shape: a record someone edited, truncated or crafted is one error naming its source and the
field, never a traceback later on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cfbench.errors import CfbenchError
from cfbench.protocol import Protocol

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
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per task, what training measured along the way: ``train_loss``, the mean training loss
    over each of at most ``train.CURVE_POINTS`` equal chunks of the task's steps (none for a
    task learned without steps, a transfer source). Not part of the config; empty in records
    written before it was kept."""
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


SCHEMA_FILE = "schema/run-record.schema.json"
"""The JSON Schema of a run record, inside the cfbench package (published; see the README)."""
_JSON = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "an integer",
         float: "a number"}
"""What each Python type read from JSON is called in an error."""
_TYPES = {"object": "an object", "array": "a list", "string": "text", "boolean": "a boolean",
          "integer": "an integer", "number": "a number", "null": "null"}
"""What each JSON Schema type is called in an error."""


@functools.cache
def record_schema() -> dict[str, Any]:
    """The JSON Schema every record read is validated against: the one description of the
    fields of schema 1 (what it cannot say, R's shape, `_checked` adds)."""
    return json.loads(importlib.resources.files("cfbench").joinpath(SCHEMA_FILE).read_text())


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(record_schema())


def _kind(value: Any) -> str:
    """How a JSON value is described in an error: its JSON type and (briefly) the value."""
    if value is None:
        return "null"
    shown = repr(value)
    return (f"{_JSON.get(type(value), type(value).__name__)} "
            f"{shown if len(shown) <= 40 else shown[:37] + '...'}")


def _where(path: Sequence[str | int]) -> str:
    """A field as an error names it: 'config.scenario', or 'R' at [1][0] inside a list."""
    lists = next((i for i, key in enumerate(path) if isinstance(key, int)), len(path))
    name = ".".join(repr(str(key))[1:-1] for key in path[:lists])  # escapes control characters
    rest = "".join(f"[{key}]" if isinstance(key, int) else f".{repr(key)[1:-1]}"
                   for key in path[lists:])
    return f"'{name}'" + (f" at {rest}" if rest else "")


def _violation(d: dict[str, Any]) -> str | None:
    """The first way `d` breaks the record schema, as one line naming the field; None if none."""
    error = next(iter(_validator().iter_errors(d)), None)
    if error is None:
        return None
    path, rule, value = list(error.absolute_path), error.validator_value, error.instance
    if error.validator == "required":
        return f"field {_where([*path, next(k for k in rule if k not in value)])} is missing"
    if error.validator == "additionalProperties":
        extra = sorted(set(value) - set(error.schema.get("properties", {})))[0]
        return f"unknown field {_where([*path, extra])}"
    if error.validator == "type":
        expected = " or ".join(_TYPES[t] for t in ([rule] if isinstance(rule, str) else rule))
    elif error.validator == "enum":
        expected = " or ".join(map(str, rule))
    elif error.validator in ("minimum", "maximum"):
        expected = ("a finite number" if abs(rule) == sys.float_info.max else
                    f"{'at least' if error.validator == 'minimum' else 'at most'} {rule}")
    elif error.validator == "pattern":
        expected = f"text matching {rule}"
    else:
        expected = f"as the schema's {error.validator!r} rule has it ({rule!r})"
    return f"field {_where(path)} must be {expected}, got {_kind(value)}"


def _floats(rows: list[list[float | None]]) -> list[list[float]]:
    """Rows of numbers the schema let through, null (an undefined number) read as NaN."""
    return [[math.nan if v is None else float(v) for v in row] for row in rows]


def _matrix(rows: list[list[float | None]], where: str) -> list[list[float]]:
    """`_floats(rows)`, whose rows must be equally long (which a schema cannot say)."""
    for t, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise _Invalid(f"field {where} is ragged: row {t} has {len(row)} entries, row 0 "
                           f"has {len(rows[0])}")
    return _floats(rows)


def _checked(d: Any) -> dict[str, Any]:
    """The keyword arguments of the RunRecord `d` holds, or `_Invalid` naming the first field
    that is not as schema 1 has it: the JSON Schema (`record_schema`), then R's shape."""
    if not isinstance(d, dict):
        raise _Invalid(f"not a run record: expected a JSON object, got {_kind(d)}")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise _Invalid(f"run record schema {d.get('schema_version')!r} is not supported (this "
                       f"cfbench reads {SCHEMA_VERSION})")
    problem = _violation(d)
    if problem:
        raise _Invalid(problem)
    R = _matrix(d.get("R", []), "'R'")
    width, finished = (len(R[0]) if R else 0), d.get("status", "ok") == "ok"
    if (R or finished) and not (width >= 1 and (len(R) == width + 1 if finished
                                                else len(R) <= width + 1)):
        raise _Invalid(f"field 'R' must have T+1 rows of T >= 1 scores (fewer rows for a run "
                       f"that did not finish), got {len(R)} rows of {width}")
    matrices = {name: _matrix(m, _where(["matrices", name]))
                for name, m in d.get("matrices", {}).items()}
    for name, m in matrices.items():
        if [len(row) for row in m] != [len(row) for row in R]:
            raise _Invalid(f"field {_where(['matrices', name])} is not shaped like R")
    curves = {name: _floats(rows) for name, rows in d.get("curves", {}).items()}
    metrics = {k: math.nan if v is None else v for k, v in d.get("metrics", {}).items()}
    return {**d, "R": R, "matrices": matrices, "curves": curves, "metrics": metrics}


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


def usual_record_folders() -> list[Path]:
    """Where records are looked for when no folder is named: the default output folder and
    every ``results/*/runs`` (the committed records and the Makefile's)."""
    found = sorted(p for p in Path("results").glob("*/runs") if p.is_dir())
    return [DEFAULT_OUT, *(p for p in found if p != DEFAULT_OUT)]


def find_record(run_id: str, directories: Sequence[Path]) -> tuple[RunRecord, list[Path]]:
    """The record whose id starts with `run_id` (a unique prefix is enough) in `directories`,
    and every file that holds that run, newest first: one run may be recorded in several
    folders (the same configuration run again), and the newest copy is the one returned."""
    check_run_id(run_id)
    files = [p for d in directories for p in sorted(d.glob(f"{run_id}*.json"))
             if RUN_ID.fullmatch(p.stem)]
    ids = sorted({p.stem for p in files})
    if len(ids) != 1:
        where = ", ".join(map(str, directories))
        if ids:
            raise CfbenchError(f"{len(ids)} runs have an id starting with '{run_id}' in "
                               f"{where} ({', '.join(ids[:5])}); give more of the id")
        raise CfbenchError(f"no run with id '{run_id}' in {where}; pass --records DIR (or "
                           "--store FILE) where the records are")
    copies = sorted(((read_record(p), p) for p in files), key=lambda c: c[0].finished_at,
                    reverse=True)
    return copies[0][0], [p for _, p in copies]


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
