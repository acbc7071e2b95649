"""The results store: one SQLite file (WAL mode), one row per run, keyed by the run id.

Each write is one transaction (BEGIN IMMEDIATE, synchronous=FULL), so a run that finished is on
disk before the next starts, a killed process loses nothing that was committed, and several
processes may write at once (they queue on SQLite's lock). The row holds the whole record as
JSON plus indexed columns for the questions a sweep asks: which runs exist, which succeeded.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cfbench.errors import CfbenchError
from cfbench.records import RunRecord, check_run_id, collect, parse_record

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    scenario    TEXT NOT NULL,
    setting     TEXT NOT NULL,
    strategy    TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT NOT NULL,
    finished_at TEXT,
    record      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_config ON runs (scenario, setting, strategy, seed);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
"""


class Store:
    """Run records in an SQLite file. Open one per process; it is not shared across forks."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise CfbenchError(f"store {self.path} is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._enable_wal(timeout)
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise CfbenchError(f"store {self.path} has schema {version}; this cfbench "
                                   f"reads {SCHEMA_VERSION}")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise CfbenchError(f"{self.path} is not a cfbench store ({exc}); give another "
                               "--store path") from None

    def _enable_wal(self, timeout: float) -> None:
        """Switch a new file to WAL mode. Several processes creating one store at once can get
        "database is locked" here without SQLite's busy handler being consulted, so retry."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put(self, record: RunRecord) -> None:
        """Insert or replace the run's row (a rerun of the same configuration replaces it)."""
        self.put_many([record])

    def put_many(self, records: Iterable[RunRecord]) -> int:
        rows = [(r.run_id, r.config["scenario"], r.config["setting"], r.config["strategy"],
                 r.config["seed"], r.status, r.finished_at, r.to_json()) for r in records]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO runs (run_id, scenario, setting, strategy, seed, status, "
                "finished_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET scenario=excluded.scenario, "
                "setting=excluded.setting, strategy=excluded.strategy, seed=excluded.seed, "
                "status=excluded.status, finished_at=excluded.finished_at, "
                "record=excluded.record", rows)
        return len(rows)

    def records(self, scenario: str | None = None, status: str | None = None,
                on_bad: Callable[[CfbenchError], None] | None = None) -> list[RunRecord]:
        """Records, optionally of one scenario or status, in run-id order; `on_bad` as in
        `cfbench.records.collect`."""
        query, args = "SELECT run_id, record FROM runs WHERE 1=1", []
        if scenario is not None:
            query, args = query + " AND scenario = ?", [*args, scenario]
        if status is not None:
            query, args = query + " AND status = ?", [*args, status]
        rows = self._db.execute(query + " ORDER BY run_id", args).fetchall()
        return collect((functools.partial(self._parse, *row) for row in rows), on_bad)

    def _parse(self, run_id: str, text: str) -> RunRecord:
        return parse_record(text, f"store {self.path}, run {run_id!r}")

    def find(self, run_id: str) -> RunRecord:
        """The record whose id starts with `run_id` (a unique prefix is enough)."""
        rows = self._db.execute("SELECT run_id, record FROM runs WHERE run_id LIKE ? || '%'",
                                (check_run_id(run_id),)).fetchall()
        if len(rows) != 1:
            problem = "no run" if not rows else f"{len(rows)} runs"
            raise CfbenchError(f"{problem} with id '{run_id}' in store {self.path}")
        return self._parse(*rows[0])

    def finished_ids(self) -> set[str]:
        """Ids of the runs stored with status ok (what a resumed sweep skips)."""
        return {r for (r,) in self._db.execute("SELECT run_id FROM runs WHERE status = 'ok'")}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def integrity(self) -> str:
        """SQLite's own consistency check: "ok" for a sound file."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def export_jsonl(self, path: Path) -> int:
        """Every record, one JSON object per line, to share or merge elsewhere."""
        records = self.records()
        path.write_text("".join(r.to_json(indent=None) + "\n" for r in records))
        return len(records)

    def import_jsonl(self, path: Path) -> int:
        """Merge the records of a JSON-lines file (same run id: the imported one wins)."""
        records = [parse_record(line, f"{path}:{number}")
                   for number, line in enumerate(path.read_bytes().splitlines(), start=1)
                   if line.strip()]
        return self.put_many(records)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
