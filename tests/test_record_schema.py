"""The published JSON Schema of a run record (cfbench/schema/run-record.schema.json) is what
cfbench checks on read: a user's own validator accepts every committed record and rejects
what cfbench rejects, except R's shape, which a schema cannot say and the schema's description
states; the schema names every field the dataclasses have, so the two cannot drift apart."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cfbench.errors import CfbenchError
from cfbench.protocol import Protocol
from cfbench.records import RunConfig, RunRecord, parse_record, read_record, record_schema
from tests.test_hostile_outputs import changed, good_record

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "cfbench" / "schema" / "run-record.schema.json"
COMMITTED = sorted({p.parent for p in ROOT.glob("results/*/runs/**/*.json")})
"""Every folder of committed records (the validation records of a tune in runs/validation)."""
DELETE = object()

SCHEMA_REJECTS: dict[str, tuple[str, Any]] = {
    "metrics null": ("metrics", None),
    "a metric as text": ("metrics.acc", "high"),
    "a metric past a float": ("metrics.acc", 10**400),
    "R as text": ("R", "[[1]]"),
    "R of text": ("R", [["a", "b"], ["c", "d"], ["e", "f"]]),
    "R nested deeper": ("R", [[[0.5]], [[0.5]]]),
    "a score above 1": ("R", [[0.5, 0.5], [1.5, 0.4], [0.9, 0.98]]),
    "no config": ("config", DELETE),
    "config a list": ("config", []),
    "no scenario": ("config.scenario", DELETE),
    "scenario a number": ("config.scenario", 7),
    "protocol as text": ("config.protocol", "fast"),
    "an unknown optimizer": ("config.protocol.optimizer", "rmsprop"),
    "an unknown protocol field": ("config.protocol.speed", 3),
    "hparams a list": ("config.hparams", [1]),
    "seed as text": ("config.seed", "0"),
    "a cost as text": ("cost.train_seconds", "fast"),
    "cost a list": ("cost", [1]),
    "an unknown status": ("status", "great"),
    "tasks a mapping": ("tasks", {"a": 1}),
    "a task without a name": ("tasks", [{}, {}]),
    "env a list": ("env", []),
    "threads as text": ("env.threads", "2"),
    "command a number": ("command", 3),
    "a selection without its keys": ("selection", {"by": 1}),
    "an unknown field": ("surprise", 1),
    "a run id that is a path": ("run_id", "../../../etc/x"),
    "schema version 2": ("schema_version", 2),
    "no schema version": ("schema_version", DELETE),
    "matrices as text": ("matrices", "x"),
    "curves a list": ("curves", [1]),
    "a curve of text": ("curves", {"train_loss": [["low"]]}),
}
SHAPE_ONLY: dict[str, list[list[float]]] = {
    "ragged R": [[0.5, 0.5], [0.9], [0.9, 0.9]],
    "R empty but ok": [],
    "R square": [[0.5, 0.5], [0.9, 0.9]],
}
"""Records only R's shape makes bad: the schema's description says so; the reader checks it."""


def mutated(path: str, value: Any) -> dict:
    return changed(path, None, delete=True) if value is DELETE else changed(path, value)


def test_the_schema_is_a_valid_draft_2020_12_schema_and_the_one_cfbench_reads():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert record_schema() == schema  # what the installed package reads is the published file


def test_the_schema_names_every_field_of_the_dataclasses():
    schema = record_schema()
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(RunRecord)}
    assert set(schema["$defs"]["config"]["properties"]) == \
        {f.name for f in dataclasses.fields(RunConfig)}
    assert set(schema["$defs"]["protocol"]["properties"]) == \
        {f.name for f in dataclasses.fields(Protocol)}


def test_what_cfbench_writes_is_valid():
    record = RunRecord.from_dict(copy.deepcopy(good_record()), "test")
    record.metrics["acc"] = float("nan")  # written as null
    jsonschema.validate(json.loads(record.to_json()), record_schema())


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_every_committed_record_is_valid(folder: Path):
    files = sorted(folder.glob("*.json"))
    assert files
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    invalid = {f.name: e.message for f in files
               for e in [jsonschema.exceptions.best_match(
                   validator.iter_errors(json.loads(f.read_text())))] if e is not None}
    assert invalid == {}
    assert all(read_record(f).run_id == f.stem for f in files)  # and cfbench reads each


@pytest.mark.parametrize("name", SCHEMA_REJECTS)
def test_the_schema_rejects_what_cfbench_rejects(name: str):
    record = mutated(*SCHEMA_REJECTS[name])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, record_schema())
    with pytest.raises(CfbenchError, match="^fedcba9876543210.json: "):
        parse_record(json.dumps(record), "fedcba9876543210.json")


@pytest.mark.parametrize("name", SHAPE_ONLY)
def test_only_the_shape_of_R_is_checked_beyond_the_schema(name: str):
    record = changed("R", SHAPE_ONLY[name])
    jsonschema.validate(record, record_schema())
    assert "T+1 rows" in record_schema()["description"]
    with pytest.raises(CfbenchError, match="field 'R'"):
        parse_record(json.dumps(record), "fedcba9876543210.json")


def test_an_error_names_the_field_and_where_in_a_list():
    cases = [("R", [[0.5, 0.5], [0.9, "x"], [0.9, 0.9]],
              "field 'R' at [1][1] must be a number or null, got text 'x'"),
             ("tasks", [{"name": "0/1"}, {}], "field 'tasks' at [1].name is missing"),
             ("config.seed", "0", "field 'config.seed' must be an integer, got text '0'"),
             ("metrics.acc", 10**400, "field 'metrics.acc' must be a finite number"),
             ("status", "great", "field 'status' must be ok or failed or interrupted"),
             ("surprise\n", 1, "unknown field 'surprise\\n'")]
    for path, value, message in cases:
        with pytest.raises(CfbenchError) as error:
            parse_record(json.dumps(changed(path, value)), "r.json")
        assert str(error.value).startswith(f"r.json: {message}"), str(error.value)
