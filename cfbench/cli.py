"""The `cfbench` command line. Bad input is one line on stderr and exit code 2.

Heavy modules (torch, pandas) are imported inside the commands so that `cfbench --help` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cfbench import __version__
from cfbench.errors import CfbenchError

# Kept here, not imported from the modules that use them, so that --help stays free of torch.
FORMATS = ("text", "md", "csv", "json", "latex", "html")
EXECUTORS = ("serial", "process", "ray")
CONVENTIONS = ("cfbench", "gem", "mammoth")

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--scenario-seed", type=int, default=0,
                   help="seed of the task sequence (class order, permutations)")
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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-seeds", action="store_true",
                   help="train the seeds of each configuration as one vectorised job where the "
                        "strategy allows it (same records; faster on a GPU)")
    p.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    p.add_argument("--out", default=None, help="directory for run records (default results/runs)")
    p.add_argument("--store", default=None, metavar="FILE",
                   help="also write each record to this SQLite results store")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="Python file that registers strategies or scenarios (repeatable)")
    p.add_argument("--format", choices=list(FORMATS), default="text",
                   help="format of the leaderboard printed at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("show", help="print one run record: R, metrics and costs")
    p.add_argument("run_id", help="run id or a unique prefix of it")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--out", default=None,
                        help="directory of run records (default results/runs)")
    source.add_argument("--store", default=None, metavar="FILE", help="SQLite results store")

    p = sub.add_parser("leaderboard", help="aggregate run records over seeds into tables and "
                                           "plots")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--records", default=None,
                        help="directory of run records (default results/runs)")
    source.add_argument("--store", default=None, metavar="FILE", help="SQLite results store")
    p.add_argument("--scenario", default=None, help="only this scenario")
    p.add_argument("--format", action="append", choices=list(FORMATS), default=None,
                   help="text, md, csv, json, latex or html (repeatable; default text)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default="cfbench",
                   help="metric convention: cfbench, or GEM's / Mammoth's to compare with "
                        "numbers they publish")
    p.add_argument("--out", default=None,
                   help="write leaderboard.<ext> per format (and plots/) here instead of "
                        "printing")
    p.add_argument("--plots", action="store_true", help="also draw the figures (needs --out)")

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
    p.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    p.add_argument("--out", default=None,
                   help="directory for run records and reproduction.md (default results/NAME); "
                        "runs already there are not rerun")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sweep", help="run a YAML sweep file (grids, seeds) into a results "
                                     "store, in parallel, resumable")
    _sweep_arguments(p)
    p = sub.add_parser("tune", help="choose a strategy's hyperparameters on a validation split "
                                    "of the training data, then run them on the test split")
    _sweep_arguments(p)

    p = sub.add_parser("data", help="fetch and verify datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download (or copy from offline sources) and verify")
    f.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10", "cifar100", "medmnist"])
    f.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    f.add_argument("--size", type=int, choices=[28, 64, 128, 224], default=28,
                   help="MedMNIST image size (the imagenet-to-medmnist option medmnist_size)")
    return parser


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="YAML sweep file (see the README's Sweeps section)")
    p.add_argument("--executor", choices=list(EXECUTORS), default="process",
                   help="serial (this process), process (a local pool, the default) or ray")
    p.add_argument("--workers", type=_positive_int,
                   help="runs at once (process: default one per core; ray: default as many as "
                        "the cluster's CPUs hold)")
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); "
                                     "default: start a local Ray instance")
    p.add_argument("--resume", action="store_true",
                   help="skip runs stored with status ok; rerun failed and interrupted ones")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and exit")
    p.add_argument("--store", metavar="FILE",
                   help="SQLite results store (default results/sweeps/NAME.sqlite)")
    p.add_argument("--out", metavar="DIR", help="also write each record as JSON to DIR")
    p.add_argument("--data-root", help="dataset directory (default $CFBENCH_DATA or a user cache)")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="Python file that registers strategies or scenarios (repeatable; "
                        "imported in every worker too)")
    p.add_argument("--quiet", action="store_true", help="no line per finished run")


def load_plugin(path: str) -> None:
    """Import a user's Python file so its @register_* decorators run."""
    file = Path(path)
    if not file.is_file():
        raise CfbenchError(f"plugin file {path} does not exist")
    from cfbench import registry

    registry.strategies.load()
    registry.scenarios.load()
    name = f"cfbench_plugin_{file.stem.replace('-', '_')}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(loaded.__file__ or "").resolve() == file.resolve():
        return  # the same file named twice registers once
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise CfbenchError(f"plugin file {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except CfbenchError:
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise CfbenchError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}"
                           ) from None


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
              + (f"; reference: {entry.reference}" if entry.reference else ""))
        if hps:
            print(f"{'':<22} {'hyperparameters' if args.kind == 'strategies' else 'options'}: "
                  f"{hps}")
    return 0


def _protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("epochs", "iterations", "batch_size", "optimizer", "lr", "model", "precision",
              "compile", "fused_optimizer")
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def _cmd_run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from tqdm.auto import tqdm

    from cfbench import registry
    from cfbench.batched import execute_many, seed_groups
    from cfbench.data import data_root
    from cfbench.experiment import load_scenario, plan_runs
    from cfbench.formats import render
    from cfbench.leaderboard import Provenance, summarize
    from cfbench.records import DEFAULT_OUT, RunRecord, write_record
    from cfbench.store import Store

    for path in args.plugin:
        load_plugin(path)
    entry = registry.scenarios.get(args.scenario)
    settings = list(entry.settings) if args.setting == "all" else _csv(args.setting)
    if args.tasks is not None and not any(hp.name == "tasks" for hp in entry.hparams):
        raise CfbenchError(f"--tasks does not apply to scenario '{args.scenario}'; it has a "
                           "fixed task sequence")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CfbenchError(f"bad --option '{item}': write KEY=VALUE")
        options[key] = value
    if args.tasks is not None:
        options["tasks"] = args.tasks
    root = data_root(args.data_root)
    configs = plan_runs(
        scenario=args.scenario, settings=settings, strategies=args.strategy,
        hparams=parse_hparams(args.hp, args.strategy), seeds=range(args.seeds),
        scenario_seed=args.scenario_seed,
        scenario_options=options,
        protocol_overrides=_protocol_overrides(args), device=args.device, data_root=root,
    )
    out = Path(args.out) if args.out else DEFAULT_OUT
    store = Store(args.store) if args.store else None
    first = configs[0]
    n_tasks = len(load_scenario(first.scenario, first.scenario_options, first.scenario_seed,
                                root, first.device).tasks)
    command = shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)])
    records, failed = [], []
    with tqdm(total=len(configs) * n_tasks, unit="task", disable=args.quiet,
              desc=f"{len(configs)} runs") as bar:

        def keep(record: RunRecord) -> None:
            record.command = command
            bar.n = bar.total * (len(records) + 1) // len(configs)  # a failed run ends early
            bar.refresh()
            path = write_record(record, out)
            if store is not None:
                store.put(record)
            records.append(record)
            if record.status != "ok":
                c = record.config
                failed.append(f"{record.run_id} ({c['setting']}/{c['strategy']}/seed "
                              f"{c['seed']}): {record.error}")
                bar.write(f"run failed: {failed[-1]}; record in {path}", file=sys.stderr)

        if args.batch_seeds:
            for group in seed_groups(configs):
                if group.reason is not None and len(group.configs) > 1:
                    bar.write(f"{group.configs[0].strategy}: seeds run one at a time "
                              f"({group.reason})", file=sys.stderr)
        execute_many(configs, root, batch=args.batch_seeds, on_record=keep,
                     on_task=lambda done, total: bar.update(1))
    if any(r.status == "ok" for r in records):
        print(render(summarize(records), args.format, Provenance.of(records, argv)), end="")
        print(f"{len(records)} run records in {out}/", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _cmd_show(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.records import DEFAULT_OUT, find_record
    from cfbench.store import Store

    if args.store:
        with Store(_existing(args.store)) as store:
            record = store.find(args.run_id)
    else:
        record = find_record(args.run_id, Path(args.out) if args.out else DEFAULT_OUT)
    c = record.config
    print(f"run {record.run_id}  status {record.status}  {record.started_at} -> "
          f"{record.finished_at}")
    print(f"{c['scenario']} / {c['setting']} / {c['strategy']}  seed {c['seed']}  scenario seed "
          f"{c['scenario_seed']}  device {c['device']}")
    print(f"hyperparameters: {c['hparams']}")
    if record.selection:
        from cfbench.leaderboard import describe_selection

        print(f"selection: {describe_selection(record.selection)}")
    if c.get("validation"):
        print(f"evaluated on a validation split of the training data: {c['validation']}")
    print(f"protocol: {c['protocol']}")
    if record.error:
        print(f"error: {record.error}")
    if record.R:
        names = [t["name"] for t in record.tasks] or [str(i + 1) for i in range(len(record.R[0]))]
        print("\nR (accuracy %, row t = after training task t; row 0 = before training)")
        print("      " + " ".join(f"{n:>7}" for n in names))
        for t, row in enumerate(record.R):
            print(f"t={t:<3} " + " ".join(f"{100 * v:7.2f}" for v in row))
    print("\nmetrics: " + ", ".join(f"{k}={v:.4f}" for k, v in record.metrics.items()))
    print("cost: " + ", ".join(f"{k}={v}" for k, v in record.cost.items()))
    return 0


def _cmd_leaderboard(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.formats import EXTENSIONS, render
    from cfbench.leaderboard import Provenance, summarize
    from cfbench.records import DEFAULT_OUT, read_records
    from cfbench.store import Store

    formats = args.format or ["text"]
    if args.plots and not args.out:
        raise CfbenchError("--plots writes files: give --out DIR")
    if len(formats) > 1 and not args.out:
        raise CfbenchError("several --format values write files: give --out DIR")
    if args.store:
        with Store(_existing(args.store)) as store:
            records = store.records(scenario=args.scenario)
    else:
        records = read_records(Path(args.records) if args.records else DEFAULT_OUT)
        if args.scenario:
            records = [r for r in records if r.config["scenario"] == args.scenario]
    if not any(r.status == "ok" for r in records):
        raise CfbenchError("no successful run records to tabulate; run `cfbench run` first or "
                           "pass --records DIR")
    summary = summarize(records, args.convention)
    provenance = Provenance.of(records, argv)
    if not args.out:
        print(render(summary, formats[0], provenance, args.convention), end="")
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
    return 0


def _existing(path: str) -> str:
    """A store to read must exist: opening a missing one would create an empty file."""
    if not Path(path).is_file():
        raise CfbenchError(f"store {path} does not exist; pass the file `cfbench run --store` "
                           "wrote")
    return path


def _cmd_reproduce(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import fnmatch

    from tqdm.auto import tqdm

    from cfbench import reproduce
    from cfbench.data import data_root

    repro = reproduce.get(args.name)
    rows = [r for r in repro.rows
            if not args.row or any(fnmatch.fnmatch(r.label, p) for p in args.row)]
    if not rows:
        raise CfbenchError(f"no row of {repro.name} matches {', '.join(args.row)}; rows: "
                           f"{', '.join(r.label for r in repro.rows)}")
    settings = args.setting or list(repro.settings)
    unknown = set(settings) - set(repro.settings)
    if unknown:
        raise CfbenchError(f"{repro.name} has no setting {', '.join(sorted(unknown))}; choose "
                           f"from {', '.join(repro.settings)}")
    seeds = args.seeds or repro.seeds
    out = Path(args.out) if args.out else Path("results") / repro.name
    with tqdm(total=len(rows) * len(settings) * seeds, unit="run", disable=args.quiet) as bar:
        outcomes = reproduce.run(
            repro, seeds=seeds, data_root=data_root(args.data_root), out=out / "runs",
            rows=rows, settings=settings, device=args.device,
            protocol_overrides={"epochs": args.epochs} if args.epochs else None,
            on_record=lambda record: bar.update(1))
    command = shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)])
    text = reproduce.table(repro, outcomes) + f"\nProduced by `{command}`.\n"
    (out / "reproduction.md").write_text(text)
    print(text, end="")
    print(f"wrote {out / 'reproduction.md'}", file=sys.stderr)
    return 0


def _sweep_setup(args: argparse.Namespace) -> tuple[Any, Path, Any]:
    """Plugins loaded, the sweep file checked and the executor chosen (all before planning, which
    loads data): (the sweep, the data root, the executor)."""
    from cfbench.data import data_root
    from cfbench.executors import RunSetup, make_executor
    from cfbench.experiment import resolve_device
    from cfbench.sweep import load_sweep

    for path in args.plugin:
        load_plugin(path)
    sweep = load_sweep(args.file)
    root = data_root(args.data_root)
    setup = RunSetup(root.resolve(), tuple(str(Path(p).resolve()) for p in args.plugin),
                     sweep.timeout)
    try:
        cuda = resolve_device(sweep.device).startswith("cuda")
    except CfbenchError as exc:
        raise CfbenchError(f"{sweep.path}:{sweep.lines.get('device', 0)}: device: {exc}") from None
    gpus = sweep.gpus if sweep.gpus is not None else float(cuda)
    if gpus and not cuda:
        raise CfbenchError(f"{sweep.path}:{sweep.lines.get('resources', 0)}: resources.gpus is "
                           f"{gpus:g} but the runs use device '{sweep.device}'; set device: cuda")
    executor = make_executor(args.executor, setup, workers=args.workers, address=args.address,
                             cpus=sweep.cpus, gpus=gpus)
    return sweep, root, executor


def _cmd_sweep(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.store import Store
    from cfbench.sweep import Outcome, dry_run_table, plan, run_sweep, stored_statuses

    sweep, root, executor = _sweep_setup(args)
    runs = plan(sweep, root)
    store_path = Path(args.store) if args.store else sweep.default_store()
    if args.dry_run:
        print(dry_run_table(runs, stored_statuses(store_path)), end="")
        print(f"{len(runs)} runs; store {store_path}", file=sys.stderr)
        return 0
    command = shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)])
    outcome = Outcome()
    with Store(store_path) as store, _summary_on_interrupt(outcome, sweep.name, store_path):
        run_sweep(runs, store=store, executor=executor, resume=args.resume, command=command,
                  out=Path(args.out) if args.out else None, outcome=outcome,
                  progress=None if args.quiet else _progress)
    print(outcome.summary(sweep.name, store_path))
    print(f"tables: cfbench leaderboard --store {store_path}")
    return EXIT_RUN_FAILED if outcome.failed else 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _summary_on_interrupt(outcome: Any, name: str, store: Path) -> Iterator[None]:
    """On Ctrl-C, say what was kept before main() reports the interruption (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        print(outcome.summary(name, store))
        raise


def _cmd_tune(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.store import Store
    from cfbench.sweep import Outcome, check_stored, dry_run_table, run_sweep, stored_statuses
    from cfbench.tune import (
        choice_lines,
        final_runs,
        group_key,
        plan_tune,
        select,
        selection_entry,
        validation_store,
    )

    sweep, root, executor = _sweep_setup(args)
    tune = plan_tune(sweep, root)
    store_path = Path(args.store) if args.store else sweep.default_store("-tuned")
    val_path = validation_store(store_path)
    if args.dry_run:
        print(dry_run_table(tune.tuning, stored_statuses(val_path)), end="")
        groups = len({group_key(r.config) for r in tune.tuning})
        print(f"{len(tune.tuning)} validation runs (store {val_path}); then the chosen values of "
              f"each of {groups} scenario/setting/strategy group(s) on seeds "
              f"{list(sweep.seeds)}: {groups * len(sweep.seeds)} runs (store {store_path})",
              file=sys.stderr)
        return 0
    for runs, path in ((tune.tuning, val_path), (tune.report, store_path)):
        check_stored(runs, stored_statuses(path), path, args.resume)  # both, before any run
    command = shlex.join(["cfbench", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out) if args.out else None
    progress = None if args.quiet else _progress
    tuning, name = Outcome(), f"{sweep.name} (validation)"
    with Store(val_path) as store:
        with _summary_on_interrupt(tuning, name, val_path):
            run_sweep(tune.tuning, store=store, executor=executor, resume=args.resume,
                      command=command, out=out, outcome=tuning, progress=progress)
        print(tuning.summary(name, val_path))
        ids = {r.config.run_id for r in tune.tuning}
        choices = select(tune, {r.run_id: r for r in store.records() if r.run_id in ids})
    print("chosen on validation:\n  " + "\n  ".join(choice_lines(list(choices.values()))))
    finals = final_runs(tune, choices)
    selections = {r.config.run_id: selection_entry(tune, choices[group_key(r.config)])
                  for r in finals}

    def annotate(record: Any) -> None:
        record.selection = selections[record.run_id]

    reported, name = Outcome(), f"{sweep.name} (test split, chosen values)"
    with Store(store_path) as store, _summary_on_interrupt(reported, name, store_path):
        run_sweep(finals, store=store, executor=executor, resume=args.resume, command=command,
                  out=out, outcome=reported, progress=progress, annotate=annotate)
    print(reported.summary(name, store_path))
    print(f"tables: cfbench leaderboard --store {store_path}")
    unchosen = any(c.candidate is None for c in choices.values())
    return EXIT_RUN_FAILED if tuning.failed or reported.failed or unchosen else 0


def _cmd_data(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from cfbench.data import data_root, fetch
    from cfbench.data.cifar import LAYOUTS, fetch_cifar
    from cfbench.data.medmnist import fetch_medmnist

    root = data_root(args.data_root)
    if args.name == "medmnist":
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, argv)
    except CfbenchError as exc:
        print(f"cfbench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cfbench: interrupted; finished runs are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped early (`| head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
