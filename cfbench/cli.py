"""The `cfbench` command line. Bad input is one line on stderr and exit code 2.

Heavy modules (torch, pandas) are imported inside the commands so that `cfbench --help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cfbench import __version__
from cfbench.errors import CfbenchError
from cfbench.protocol import PER_SEED, Protocol, protocol_value
from cfbench.registry import load_plugin

# Kept here, not imported from the modules that use them, so that --help stays free of torch.
TEXT_CORPORA = ("fortunes", "bible-kjv", "python-docs", "python-code", "gcide")  # data/text.py
FORMATS = ("text", "md", "summary", "csv", "json", "latex", "html")
EXECUTORS = ("serial", "process", "ray")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # trackers.py
CONVENTIONS = ("cfbench", "gem", "mammoth")

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # Ctrl-C and SIGTERM alike (`cfbench.runs`)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _scenario_seed(text: str) -> int | str:
    return PER_SEED if text == PER_SEED else _integer(text, 0, f"a seed >= 0 or '{PER_SEED}'")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:  # not inf either: no run would end, no timer takes it
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are ours: one line naming the flag and where help is, exit 2,
    instead of a usage block (subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        raise CfbenchError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cfbench",
        description="Benchmark catastrophic-forgetting mitigation strategies on task sequences.",
    )
    parser.add_argument("--version", action="version", version=f"cfbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered strategies or scenarios")
    p.add_argument("kind", choices=["strategies", "scenarios"])
    p.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'split-*'")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="Python file that registers strategies or scenarios (repeatable)")

    p = sub.add_parser("run", help="run strategies through a scenario and print a leaderboard")
    p.add_argument("--scenario", required=True)
    p.add_argument("--setting", default="all",
                   help="task, domain, class, a comma list, or all the scenario supports")
    p.add_argument("--strategy", required=True, type=_csv,
                   help="comma list; compose with '+', e.g. naive,ewc,ewc+replay")
    p.add_argument("--hp", action="append", default=[], metavar="[STRATEGY.]KEY=VALUE",
                   help="hyperparameter (repeatable); a bare KEY goes to every strategy that "
                        "declares it")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="number of training seeds (0..N-1)")
    p.add_argument("--scenario-seed", type=_scenario_seed, default=0,
                   help="seed of the task sequence (class order, permutations), or 'seed': "
                        "each run's training seed, so every seed has its own sequence (van de "
                        "Ven et al.'s per-seed class order)")
    p.add_argument("--tasks", type=_positive_int, help="number of tasks (scenarios with a "
                                                        "'tasks' option)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario option (repeatable), e.g. --option target_tasks=5; "
                        "`cfbench list scenarios` shows each scenario's options")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_float, help="epochs per task")
    budget.add_argument("--iterations", type=_positive_int, help="optimizer steps per task")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--model", help="backbone spec, e.g. mlp:100,100")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="bf16: forward passes under bfloat16 autocast (default fp32)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile the model with torch.compile (pays off on a GPU)")
    p.add_argument("--fused-optimizer", action="store_true", default=None,
                   help="the optimizer's fused kernel (faster; rounds differently)")
    p.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                   help="any protocol field (repeatable), read as a sweep file's protocol: "
                        f"{', '.join(f.name for f in dataclasses.fields(Protocol))}; e.g. "
                        "--protocol class_scope=all --protocol reset_optimizer=false (the flags "
                        "above are short for the common ones)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default=None, help="directory for run records (default results/runs)")
    p.add_argument("--store", default=None, metavar="FILE",
                   help="also write each record to this SQLite results store (--resume then "
                        "counts a run held by the store or by --out)")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help="per run (loading data not counted); past it the run is a failed record")
    p.add_argument("--format", choices=list(FORMATS), default="text",
                   help="format of the leaderboard printed at the end")
    _execution_arguments(p, "serial", resume=True)

    p = sub.add_parser("show", help="print one run record: R, metrics and costs")
    p.add_argument("run_id", help="run id or a unique prefix of it")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--records", "--out", dest="records", default=None, metavar="DIR",
                        help="directory of run records (default: results/runs and every "
                             "results/*/runs); --out is the old spelling")
    source.add_argument("--store", default=None, metavar="FILE", help="SQLite results store")

    p = sub.add_parser("leaderboard", help="aggregate run records over seeds into tables and "
                                           "plots")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--records", default=None,
                        help="directory of run records (default results/runs)")
    source.add_argument("--store", default=None, metavar="FILE", help="SQLite results store")
    p.add_argument("--scenario", action="append", default=None,
                   help="only this scenario (repeatable)")
    p.add_argument("--format", action="append", choices=list(FORMATS), default=None,
                   help="text, md, summary (one Markdown table: a row per strategy, a column "
                        "per scenario and setting), csv, json, latex or html (repeatable; "
                        "default text)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default="cfbench",
                   help="metric convention: cfbench, or GEM's / Mammoth's to compare with "
                        "numbers they publish")
    p.add_argument("--out", default=None,
                   help="write leaderboard.<ext> per format (and plots/; beside a CSV, "
                        "leaderboard.meta.json: its caption and provenance) here instead of "
                        "printing")
    p.add_argument("--plots", action="store_true", help="also draw the figures (needs --out)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out run records that are not valid, with a warning each "
                        "(default: the first one is an error)")

    p = sub.add_parser("reproduce", help="rerun a published table with our strategies and "
                                         "print our numbers beside the published ones")
    p.add_argument("name", help="e.g. hsu2018-split-mnist")
    p.add_argument("--seeds", type=_positive_int, help="seeds per row (default: the paper's)")
    p.add_argument("--epochs", type=_positive_float,
                   help="epochs per task instead of the paper's (a quicker, looser check)")
    p.add_argument("--setting", type=_csv, help="comma list of settings (default: all)")
    p.add_argument("--row", action="append", default=[], metavar="PATTERN",
                   help="only rows whose label matches this shell wildcard (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default=None,
                   help="directory for run records and reproduction.md (default results/NAME); "
                        "runs already there with status ok are not rerun")
    _execution_arguments(p, "serial", resume=False)

    p = sub.add_parser("sweep", help="run a YAML sweep file (grids, seeds) into a results "
                                     "store, in parallel, resumable")
    _sweep_arguments(p)
    p = sub.add_parser("tune", help="choose a strategy's hyperparameters on a validation split "
                                    "of the training data, then run them on the test split")
    _sweep_arguments(p)

    p = sub.add_parser("data", help="fetch and verify datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download (or copy from offline sources) and verify")
    f.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10", "cifar100", "medmnist",
                                    *TEXT_CORPORA, "textgenrnn", "gpt2-gcide"])
    f.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    f.add_argument("--size", type=int, choices=[28, 64, 128, 224], default=28,
                   help="MedMNIST image size (the imagenet-to-medmnist option medmnist_size)")
    return parser


def _execution_arguments(p: argparse.ArgumentParser, executor: str, *, resume: bool) -> None:
    """Where and how runs execute: the same options for run, sweep, tune and reproduce (which
    always resumes, and runs built-in strategies only)."""
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="skip runs already recorded with status ok; rerun failed and "
                            "interrupted ones (without it, run reruns and replaces them; sweep "
                            "and tune refuse a store that holds any)")
        p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                       help="Python file that registers strategies or scenarios (repeatable; "
                            "imported in every worker too)")
    p.add_argument("--executor", choices=list(EXECUTORS), default=executor,
                   help=f"serial (this process), process (a local pool) or ray; default "
                        f"{executor}")
    p.add_argument("--workers", type=_positive_int,
                   help="runs at once (process: default one per core; ray: default as many as "
                        "the cluster's CPUs hold)")
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, HOST:6379, "
                                     "ray://head:10001); default: start a local Ray instance "
                                     "(even if RAY_ADDRESS is set or `ray start` ran)")
    p.add_argument("--ray-dashboard", action="store_true",
                   help="start the local Ray instance with its dashboard and print its address "
                        "(needs pip install 'ray[default]')")
    p.add_argument("--stack", "--batch-seeds", dest="stack", action="store_true",
                   help="train runs that differ only in seed, learning rate or a hyperparameter "
                        "the strategy takes per member (EWC's lam, LwF's alpha) as one stacked "
                        "job where the strategy allows it (the same records; less overhead per "
                        "step; a job of K runs may take K times the timeout)")
    p.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    p.add_argument("--quiet", action="store_true", help="no line per finished run")
    p.add_argument("--log", action="append", default=[], choices=list(TRACKERS),
                   help="also log each run to an experiment tracker: its config, loss curve, R "
                        "after each task, metrics, costs and a figure (repeatable; needs pip "
                        "install 'cfbench[TRACKER]')")
    p.add_argument("--log-dir", metavar="DIR",
                   help="where trackers write (default: logs/ beside the records); wandb runs "
                        "offline unless WANDB_MODE is set, mlflow writes DIR/mlflow.db unless "
                        "MLFLOW_TRACKING_URI is set")
    p.add_argument("--yes", action="store_true",
                   help="go ahead with a plan of very many runs (refused without it, with the "
                        "count)")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="YAML sweep file (see the README's Sweeps section)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and exit")
    p.add_argument("--store", metavar="FILE",
                   help="SQLite results store (default results/sweeps/NAME.sqlite)")
    p.add_argument("--out", metavar="DIR", help="also write each record as JSON to DIR")
    _execution_arguments(p, "process", resume=True)


def parse_hparams(items: Sequence[str], strategies: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["ewc.lam=10", "gamma=0.9"]`` -> per-strategy dicts of raw string values."""
    from cfbench import registry
    from cfbench.strategy import strategy_names

    names = sorted({n for spec in strategies for n in strategy_names(spec)})
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CfbenchError(f"bad --hp '{item}': write KEY=VALUE or STRATEGY.KEY=VALUE")
        owner, dot, key = key.rpartition(".")
        if dot:
            targets = [owner]
        else:
            targets = [n for n in names
                       if any(hp.name == key for hp in registry.strategies.get(n).hparams)]
            if not targets:
                raise CfbenchError(f"unknown hyperparameter '{key}': none of "
                                   f"{', '.join(names)} declares it (see `cfbench list "
                                   "strategies`)")
        for target in targets:
            out.setdefault(target, {})[key] = value
    return out


def _cmd_list(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench import registry

    for path in args.plugin:
        load_plugin(path)
    reg = registry.strategies if args.kind == "strategies" else registry.scenarios
    names = reg.names(args.pattern)
    if not names:
        raise CfbenchError(f"no {args.kind} match '{args.pattern}'; try `cfbench list "
                           f"{args.kind}`")
    for name in names:
        entry = reg.get(name)
        hps = ", ".join(f"{hp.name}: {hp.type_name} = {hp.default!r}" for hp in entry.hparams)
        print(f"{name:<22} [{entry.family}] {entry.summary}")
        print(f"{'':<22} settings: {', '.join(entry.settings)}"
              + (f"; reference: {entry.reference}" if entry.reference else "")
              + f"; source: {entry.source}")
        if hps:
            print(f"{'':<22} {'hyperparameters' if args.kind == 'strategies' else 'options'}: "
                  f"{hps}")
    return 0


PROTOCOL_FLAGS = ("epochs", "iterations", "batch_size", "optimizer", "lr", "model", "precision",
                  "compile", "fused_optimizer")
"""Protocol fields with a flag of their own; `--protocol KEY=VALUE` sets any field."""


def _protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol fields the flags set: the short flags, then each `--protocol KEY=VALUE`
    (read by `protocol_value`, as a sweep file's protocol is); a field set twice is an error."""
    out = {f: getattr(args, f) for f in PROTOCOL_FLAGS if getattr(args, f) is not None}
    for item in args.protocol:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CfbenchError(f"bad --protocol '{item}': write KEY=VALUE, e.g. "
                               "--protocol class_scope=all")
        if key in out:
            raise CfbenchError(f"protocol field '{key}' is set twice; give it once")
        try:
            out[key] = protocol_value(key, value)
        except CfbenchError as exc:
            raise CfbenchError(f"bad --protocol {item}: {exc}") from None
    return out


def _cmd_run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench import api, registry
    from cfbench.data import data_root
    from cfbench.formats import render, terminal_width
    from cfbench.leaderboard import Provenance

    for path in args.plugin:
        load_plugin(path)
    entry = registry.scenarios.get(args.scenario)
    if args.tasks is not None and not any(hp.name == "tasks" for hp in entry.hparams):
        raise CfbenchError(f"--tasks does not apply to scenario '{args.scenario}'; it has a "
                           "fixed task sequence")
    scenario_options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CfbenchError(f"bad --option '{item}': write KEY=VALUE")
        scenario_options[key] = value
    if args.tasks is not None:
        scenario_options["tasks"] = args.tasks
    root = data_root(args.data_root)
    records = api.run(
        args.scenario, args.strategy, setting=args.setting, seeds=args.seeds, out=args.out,
        store=args.store, hparams=parse_hparams(args.hp, args.strategy),
        scenario_seed=args.scenario_seed, scenario_options=scenario_options,
        device=args.device, data_root=root, plugins=args.plugin, yes=args.yes,
        options=_options(args, argv, root, timeout=args.timeout, report=_stderr, replace=True),
        **_protocol_overrides(args))
    if any(r.status == "ok" for r in records):
        print(render(api.tabulate(records), args.format, Provenance.of(records, argv),
                     width=terminal_width()), end="")
    return EXIT_RUN_FAILED if any(r.status == "failed" for r in records) else 0


def _options(args: argparse.Namespace, argv: Sequence[str] | None, root: Path, *,
             timeout: float | None = None, cpus: float = 1.0, gpus: float | None = None,
             report: Callable[[str], None], replace: bool = False, log: Sequence[str] = ()
             ) -> Any:
    """The `RunOptions` the execution flags ask for, checked before planning loads any data
    (reproduce has no --resume or --plugin: it always resumes). Ray gives a run on CUDA a GPU
    unless `gpus` says otherwise. `log`: trackers a sweep file names, besides --log."""
    from cfbench.executors import RunSetup, make_executor
    from cfbench.experiment import resolve_device
    from cfbench.progress import for_stderr
    from cfbench.runs import RunOptions, check_writable
    from cfbench.trackers import tracking

    trackers = tracking([*log, *args.log], args.log_dir)  # a missing library fails here
    if args.log_dir:
        check_writable(Path(args.log_dir), "--log-dir", directory=True)
    gpus = float(resolve_device(args.device).startswith("cuda")) if gpus is None else gpus
    plugins = tuple(str(Path(p).resolve()) for p in getattr(args, "plugin", []))
    executor = make_executor(args.executor, RunSetup(root.resolve(), plugins, timeout),
                             workers=args.workers, address=args.address, cpus=cpus, gpus=gpus,
                             dashboard=args.ray_dashboard)
    return RunOptions(executor, resume=getattr(args, "resume", True), replace=replace,
                      stack=args.stack, report=report, tracking=trackers,
                      command=shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)]),
                      progress=for_stderr(_stderr, args.quiet))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_show(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.formats import number, one_line, record_summary
    from cfbench.records import find_record, usual_record_folders
    from cfbench.store import Store

    copies = []
    if args.store:
        with Store(_existing(args.store)) as store:
            record = store.find(args.run_id)
    else:
        folders = [Path(args.records)] if args.records else usual_record_folders()
        record, copies = find_record(args.run_id, folders)

    def say(text: str = "") -> None:  # a record's text never steers the terminal
        print(one_line(text))

    c = record.config
    say(f"run {record.run_id}  status {record.status}  {record.started_at} -> "
        f"{record.finished_at}")
    if copies:
        also = f" (the newest; also in {', '.join(str(p.parent) for p in copies[1:])})"
        say(f"record: {copies[0]}{also if len(copies) > 1 else ''}")
    say(f"{c['scenario']} / {c['setting']} / {c['strategy']}  seed {c['seed']}  scenario seed "
        f"{c['scenario_seed']}  device {c['device']}")
    say(f"hyperparameters: {c['hparams']}")
    if record.selection:
        from cfbench.leaderboard import describe_selection

        say(f"selection: {describe_selection(record.selection)}")
    if c.get("validation"):
        say(f"evaluated on a validation split of the training data: {c['validation']}")
    say(f"protocol: {c['protocol']}")
    if record.error:
        say(f"error: {record.error}")
    if record.R:
        names = [t["name"] for t in record.tasks] or [str(i + 1) for i in range(len(record.R[0]))]
        say()
        say("R (accuracy %, row t = after training task t; row 0 = before training)")
        say("      " + " ".join(f"{n:>7}" for n in names))
        for t, row in enumerate(record.R):
            say(f"t={t:<3} " + " ".join(
                f"{number(None if v is None else 100 * v, 'acc'):>7}" for v in row))
    if record.status == "ok":
        metrics, costs = record_summary(record)
        say()
        say(f"metrics: {metrics}")
        say(f"cost: {costs}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench import api
    from cfbench.formats import EXTENSIONS, render, render_meta, terminal_width
    from cfbench.leaderboard import Provenance
    from cfbench.records import DEFAULT_OUT

    formats = args.format or ["text"]
    if args.plots and not args.out:
        raise CfbenchError("--plots writes files: give --out DIR")
    if len(formats) > 1 and not args.out:
        raise CfbenchError("several --format values write files: give --out DIR")
    if args.out:
        from cfbench.runs import check_writable

        check_writable(Path(args.out), "--out", directory=True)

    def skipped(exc: CfbenchError) -> None:
        print(f"cfbench: warning: skipped {exc}", file=sys.stderr)

    records = api.load_records(_existing(args.store) if args.store else
                               args.records or DEFAULT_OUT, scenario=args.scenario,
                               on_bad=skipped if args.skip_bad else None)
    summary = api.tabulate(records, args.convention)
    provenance = Provenance.of(records, argv)
    if not args.out:
        print(render(summary, formats[0], provenance, args.convention, width=terminal_width()),
              end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = None
    if args.plots:
        from cfbench.plots import plot_all

        plots = plot_all(records, summary, out / "plots")
    for fmt in formats:
        path = out / f"leaderboard.{EXTENSIONS[fmt]}"
        path.write_text(render(summary, fmt, provenance, args.convention, plots))
        print(f"wrote {path}")
        if fmt == "csv":  # the CSV holds the table alone; what it means and its origin beside it
            meta = out / "leaderboard.meta.json"
            meta.write_text(render_meta(provenance, args.convention))
            print(f"wrote {meta}")
    return 0


def _existing(path: str) -> str:
    """A store to read must exist: opening a missing one would create an empty file."""
    if not Path(path).is_file():
        raise CfbenchError(f"store {path} does not exist; pass the file `cfbench run --store` "
                           "wrote")
    return path


def _cmd_reproduce(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench import reproduce
    from cfbench.data import data_root
    from cfbench.runs import PlannedRun, Sink, run_plan

    repro = reproduce.get(args.name)
    out = Path(args.out) if args.out else Path("results") / repro.name
    root = data_root(args.data_root)
    options = _options(args, argv, root, report=_stderr)
    sink = Sink(out / "runs")  # checked before planning loads any data
    with options.progress.loading(f"the scenarios of {repro.name} (data root {root})"):
        plan = reproduce.plan(repro, data_root=root, seeds=args.seeds, rows=args.row,
                              settings=args.setting, epochs=args.epochs, device=args.device)
    with sink:
        outcome = run_plan([PlannedRun(c, {"row": row.label}) for row, _, configs in plan
                            for c in configs], sink, repro.name, options)
    text = (reproduce.table(repro, reproduce.results(repro, plan, outcome.records()))
            + f"\nProduced by `{options.command}`.\n")
    (out / "reproduction.md").write_text(text)
    print(text, end="")
    print(f"wrote {out / 'reproduction.md'}", file=sys.stderr)
    return EXIT_RUN_FAILED if outcome.failed else 0


def _sweep_setup(args: argparse.Namespace, argv: Sequence[str] | None) -> tuple[Any, Path, Any]:
    """Plugins loaded, the sweep file checked, the executor chosen: before planning loads data."""
    from cfbench.data import data_root
    from cfbench.sweepfile import load_sweep

    for path in args.plugin:
        load_plugin(path)
    sweep = load_sweep(args.file)
    root = data_root(args.data_root)
    return sweep, root, _options(args, argv, root, timeout=sweep.timeout, cpus=sweep.cpus,
                                 gpus=sweep.gpus, report=print, log=sweep.log)


def _cmd_sweep(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.runs import Sink, check_run_count, plural, run_plan
    from cfbench.sweep import dry_run_table, plan, size

    sweep, root, options = _sweep_setup(args, argv)
    check_run_count(size(sweep), args.yes)
    store = Path(args.store) if args.store else sweep.default_store()
    sink = Sink(args.out, store)  # checked before planning loads any data
    with options.progress.loading(f"the scenarios of {sweep.name} (data root {root})"):
        runs = plan(sweep, root)
    with sink:
        if args.dry_run:
            print(dry_run_table(runs, sink.stored()), end="")
            print(f"{plural(len(runs), 'run')}; {sink.where}", file=sys.stderr)
            return 0
        outcome = run_plan(runs, sink, sweep.name, options)
    print(f"tables: cfbench leaderboard --store {store}")
    return EXIT_RUN_FAILED if outcome.failed else 0


def _cmd_tune(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.runs import check_run_count
    from cfbench.sweep import size
    from cfbench.tune import tune

    sweep, root, options = _sweep_setup(args, argv)
    check_run_count(size(sweep, [*sweep.tune.seeds, *sweep.seeds] if sweep.tune else None),
                    args.yes)
    store = Path(args.store) if args.store else sweep.default_store("-tuned")
    return 0 if tune(sweep, root, store, options, out=args.out, dry_run=args.dry_run) else \
        EXIT_RUN_FAILED


def _cmd_data(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.data import data_root, fetch
    from cfbench.data.cifar import LAYOUTS, fetch_cifar
    from cfbench.data.medmnist import fetch_medmnist

    root = data_root(args.data_root)
    if args.name in TEXT_CORPORA:
        from cfbench.data.text import fetch_corpus

        path = fetch_corpus(args.name, root)
    elif args.name == "textgenrnn":
        from cfbench.data.textgenrnn import fetch_textgenrnn

        path = fetch_textgenrnn(root)
    elif args.name == "gpt2-gcide":
        from cfbench.gpt import fetch_gpt2_gcide

        path = fetch_gpt2_gcide(root)
    elif args.name == "medmnist":
        path = fetch_medmnist(root, size=args.size)
    elif args.name in LAYOUTS:
        path = fetch_cifar(args.name, root)
    else:
        path = fetch(args.name, root)
    print(f"{args.name}: verified files in {path}")
    return 0


COMMANDS = {"list": _cmd_list, "run": _cmd_run, "show": _cmd_show,
            "leaderboard": _cmd_leaderboard, "reproduce": _cmd_reproduce,
            "sweep": _cmd_sweep, "tune": _cmd_tune, "data": _cmd_data}


def _warn_broken_plugins() -> None:
    """One line per installed plugin package that failed to import, once the command is done
    (a command that names one of its names fails instead, with one line)."""
    from cfbench import registry

    for broken in (*registry.strategies.broken, *registry.scenarios.broken):
        print(f"cfbench: warning: skipped {broken}; fix or uninstall it, or set "
              f"{registry.DISABLE_AUTOLOAD}=1 to skip plugin packages", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM, what a cluster scheduler sends before it kills a job, is handled as Ctrl-C is.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args = _parser().parse_args(argv)
        code = COMMANDS[args.command](args, argv)
        _warn_broken_plugins()
        return code
    except CfbenchError as exc:
        print(f"cfbench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cfbench: interrupted; finished runs are kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into a reader that stopped early (`| head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
