"""Registry, typed hyperparameters, strategy composition and plugin loading.

Every name a test registers (directly, through a plugin file or through an entry point) is
unregistered again by the autouse `clean_registries` fixture, so the global registries end each
test as they began.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

from cfbench import registry
from cfbench.cli import main, parse_hparams
from cfbench.errors import CfbenchError
from cfbench.records import RunConfig, parse_record, read_records
from cfbench.registry import load_plugin
from cfbench.strategy import (
    Batch,
    Compose,
    Strategy,
    TrainData,
    build_strategy,
    resolve_hparams,
    strategy_names,
)

TEST_MODULE_PREFIXES = ("cfbench_plugin_", "cfb_test_")
"""Modules a test imports: plugin files (named by `load_plugin`) and entry-point modules."""


@pytest.fixture(autouse=True)
def clean_registries():
    """Unregister every name and drop every plugin module a test added."""
    before = {reg: set(reg.names()) for reg in (registry.strategies, registry.scenarios)}
    try:
        yield
    finally:
        for reg, names in before.items():
            for name in set(reg.names()) - names:
                reg.unregister(name)
        for module in [m for m in sys.modules if m.startswith(TEST_MODULE_PREFIXES)]:
            del sys.modules[module]


def register(name: str, factory: type, **meta) -> registry.Entry:
    registry.strategies.register(name, **meta)(factory)
    return registry.strategies.get(name)


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    """The message of a CfbenchError, checked to be the promised single line."""
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# Test strategies: plain classes, registered inside the tests that need them.


class Typed(Strategy):
    """Declares one hyperparameter of every supported type."""

    def __init__(self, *, steps: int = 1, rate: float = 0.1, flag: bool = False,
                 label: str = "x", mode: Literal["a", "b"] = "a", cap: int | None = 4,
                 tags: tuple[str, ...] = ()) -> None:
        self.steps, self.rate, self.flag, self.label = steps, rate, flag, label
        self.mode, self.cap, self.tags = mode, cap, tags


class Lam(Strategy):
    """Shares the hyperparameter name `lam` with EWC."""

    def __init__(self, *, lam: float = 1.0) -> None:
        self.lam = lam


class Doubles(Strategy):
    def batch(self, ctx, batch: Batch) -> Batch:
        return Batch(batch.x * 2, batch.y, batch.task)

    def penalty(self, ctx, batch, logits) -> torch.Tensor:
        return torch.tensor(1.5)


class Increments(Strategy):
    def batch(self, ctx, batch: Batch) -> Batch:
        return Batch(batch.x + 1, batch.y, batch.task)

    def penalty(self, ctx, batch, logits) -> torch.Tensor:
        return torch.tensor(2.0)


class NoPenalty(Strategy):
    def penalty(self, ctx, batch, logits) -> None:
        return None


PARAMS = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]


class GroupsA(Strategy):
    """Trains parameters 0 and 1 (a freezing strategy: no options)."""

    def param_groups(self, ctx):
        return [{"params": PARAMS[:2]}]


class GroupsB(Strategy):
    """Gives every parameter its own learning rate (a layer-wise strategy)."""

    def param_groups(self, ctx):
        return [{"params": [PARAMS[0]], "lr": 0.1}, {"params": PARAMS[1:], "lr": 0.01}]


class GroupsC(Strategy):
    def param_groups(self, ctx):
        return [{"params": PARAMS, "lr": 0.5}]


# 1. Registration and typed hyperparameters


def test_register_records_typed_hyperparameters_and_metadata():
    entry = register("t-typed", Typed, family="test", reference="nobody 2024",
                     settings=("task", "class"))
    assert entry.name == "t-typed" and entry.factory is Typed and entry.kind == "strategy"
    assert (entry.family, entry.reference, entry.settings) == ("test", "nobody 2024",
                                                              ("task", "class"))
    assert entry.summary == "Declares one hyperparameter of every supported type."
    assert [(hp.name, hp.default) for hp in entry.hparams] == [
        ("steps", 1), ("rate", 0.1), ("flag", False), ("label", "x"), ("mode", "a"),
        ("cap", 4), ("tags", ()),
    ]
    types = {hp.name: hp.type_name for hp in entry.hparams}
    assert types["rate"] == "float" and types["mode"] == "a|b" and types["cap"] == "int | None"


def test_resolve_coerces_strings_and_overlays_defaults():
    entry = register("t-typed", Typed)
    resolved = entry.resolve({"steps": "3", "rate": "0.5", "flag": "true", "cap": "none",
                              "tags": "a,b", "mode": "b"})
    assert resolved == {"steps": 3, "rate": 0.5, "flag": True, "label": "x", "mode": "b",
                        "cap": None, "tags": ("a", "b")}
    assert type(resolved["steps"]) is int and type(resolved["rate"]) is float
    assert entry.resolve({}) == {"steps": 1, "rate": 0.1, "flag": False, "label": "x",
                                 "mode": "a", "cap": 4, "tags": ()}
    more = entry.resolve({"flag": "off", "cap": "7", "tags": " c , d ,", "rate": 2})
    assert (more["flag"], more["cap"], more["tags"], more["rate"]) == (False, 7, ("c", "d"), 2.0)
    assert type(more["rate"]) is float


def test_registered_class_is_returned_unchanged_and_builds_with_resolved_values():
    assert registry.strategies.register("t-typed")(Typed) is Typed
    strategy = build_strategy("t-typed", resolve_hparams("t-typed", {"t-typed": {"steps": "9"}}),
                              "class")
    assert isinstance(strategy, Typed) and strategy.steps == 9 and strategy.rate == 0.1


# 2. Errors


def test_duplicate_name_names_the_existing_class():
    register("t-dup", Typed)
    with pytest.raises(CfbenchError) as excinfo:
        registry.strategies.register("t-dup")(Lam)
    text = error_text(excinfo)
    assert "duplicate strategy name 't-dup'" in text
    assert f"{Typed.__module__}.Typed" in text
    assert registry.strategies.get("t-dup").factory is Typed  # the first one stays


def test_duplicate_of_a_builtin_name_points_at_the_builtin():
    with pytest.raises(CfbenchError) as excinfo:
        registry.strategies.register("ewc")(Lam)
    assert "cfbench.strategies.regularization.EWC" in error_text(excinfo)


def test_unknown_strategy_suggests_a_close_match_and_the_list_command():
    with pytest.raises(CfbenchError) as excinfo:
        registry.strategies.get("ewk")
    text = error_text(excinfo)
    assert "unknown strategy 'ewk'" in text and "did you mean ewc" in text
    assert "cfbench list strategies" in text


def test_unknown_scenario_points_at_the_scenario_list():
    with pytest.raises(CfbenchError) as excinfo:
        registry.scenarios.get("split-mnsit")
    text = error_text(excinfo)
    assert "did you mean split-mnist" in text and "cfbench list scenarios" in text


def test_unknown_hyperparameter_lists_valid_ones_and_a_close_match():
    with pytest.raises(CfbenchError) as excinfo:
        registry.strategies.get("ewc").resolve({"lamb": "1"})
    text = error_text(excinfo)
    assert "unknown hyperparameter 'lamb' for strategy 'ewc'" in text
    assert "did you mean lam" in text
    assert "valid: lam, fisher, fisher_samples, fisher_batch" in text


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("rate", "abc", "expected float"),
    ("rate", "nan", "expected float"),
    ("steps", "3.5", "expected int"),
    ("flag", "maybe", "expected bool"),
    ("mode", "c", "expected a|b (choose one of a, b)"),
    ("cap", "many", "expected int | None"),
])
def test_ill_typed_value_is_a_one_line_error(name, value, expected):
    entry = register("t-typed", Typed)
    with pytest.raises(CfbenchError) as excinfo:
        entry.resolve({name: value})
    text = error_text(excinfo)
    assert f"bad value '{value}' for hyperparameter '{name}' of strategy 't-typed'" in text
    assert expected in text and f"--hp {name}=" in text


class NoDefault(Strategy):
    def __init__(self, *, lam: float) -> None: ...


class NoType(Strategy):
    def __init__(self, *, lam=1.0) -> None: ...


class Positional(Strategy):
    def __init__(self, lam: float = 1.0) -> None: ...


class Unsupported(Strategy):
    def __init__(self, *, sizes: list[int] = None) -> None: ...


@pytest.mark.parametrize(("factory", "message"), [
    (NoDefault, "'lam' needs a type and a default"),
    (NoType, "'lam' needs a type and a default"),
    (Positional, "'lam' must be keyword-only"),
    (Unsupported, "unsupported hyperparameter type"),
])
def test_badly_declared_hyperparameter_fails_at_registration(factory, message):
    with pytest.raises(TypeError, match=message):
        registry.strategies.register("t-bad")(factory)
    assert "t-bad" not in registry.strategies.names()


@pytest.mark.parametrize(("name", "meta", "message"), [
    ("a+b", {}, "'\\+' composes strategies"),
    ("  ", {}, "invalid strategy name"),
    ("t-ok", {"settings": ("online",)}, "unknown settings"),
])
def test_bad_name_or_settings_fail_at_registration(name, meta, message):
    with pytest.raises(ValueError, match=message):
        registry.strategies.register(name, **meta)
    assert registry.strategies.names("t-*") == []


# 3. Wildcard listing


def test_wildcard_listing():
    split = registry.scenarios.names("split-*")
    assert {"split-mnist", "split-fashion-mnist", "split-digits"} <= set(split)
    assert "permuted-mnist" not in split and split == sorted(split)
    assert {"naive", "joint", "ewc"} <= set(registry.strategies.names())
    assert registry.strategies.names("e?c") == ["ewc"]
    assert registry.strategies.names("EWC") == []  # case-sensitive


# 4. Composition


def test_strategy_names_splits_and_validates():
    assert strategy_names("ewc+naive") == ["ewc", "naive"]
    assert strategy_names(" ewc + joint ") == ["ewc", "joint"]
    assert strategy_names("naive") == ["naive"]


def test_names_may_end_in_plus_signs():
    assert strategy_names("ewc+der++") == ["ewc", "der++"]
    assert strategy_names("der+++ewc") == ["der++", "ewc"]
    with pytest.raises(CfbenchError, match="unknown strategy 'ewc\\+'"):
        strategy_names("ewc+")


@pytest.mark.parametrize("spec", ["+ewc", "ewc+ewc", "der+++der++", ""])
def test_bad_composition_spec(spec):
    with pytest.raises(CfbenchError) as excinfo:
        strategy_names(spec)
    assert f"bad strategy '{spec}'" in error_text(excinfo)


def test_composition_with_an_unknown_part_names_it():
    with pytest.raises(CfbenchError, match="unknown strategy 'ewk'"):
        strategy_names("naive+ewk")


def test_resolve_hparams_rejects_hparams_for_a_strategy_not_in_the_spec():
    with pytest.raises(CfbenchError) as excinfo:
        resolve_hparams("naive", {"ewc": {"lam": "1"}})
    assert "given for ewc, which is not part of strategy 'naive'" in error_text(excinfo)


def test_build_composed_strategy_sums_state_bytes():
    hparams = resolve_hparams("ewc+joint", {"ewc": {"lam": "5", "fisher": "empirical"}})
    assert hparams["joint"] == {} and hparams["ewc"]["lam"] == 5.0
    strategy = build_strategy("ewc+joint", hparams, "class")
    assert isinstance(strategy, Compose)
    ewc, joint = strategy.parts
    assert type(ewc).__name__ == "EWC" and type(joint).__name__ == "Joint"
    assert (ewc.lam, ewc.fisher_labels) == (5.0, "empirical")
    assert strategy.state_bytes() == 0
    joint.seen.append(TrainData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
                                torch.zeros(4, dtype=torch.int64),
                                torch.zeros(4, dtype=torch.int64)))
    ewc.importance, ewc.anchor = {"w": torch.zeros(3)}, {"w": torch.zeros(3)}
    assert joint.state_bytes() == 16 + 32 + 32 and ewc.state_bytes() == 24
    assert strategy.state_bytes() == 104


def test_build_reports_invalid_hyperparameters_of_the_factory():
    with pytest.raises(CfbenchError) as excinfo:
        build_strategy("ewc", resolve_hparams("ewc", {"ewc": {"lam": "-1"}}), "class")
    assert "bad hyperparameters for strategy 'ewc': lam must be >= 0" in error_text(excinfo)


def test_composed_parameter_groups_intersect():
    register("t-groups-a", GroupsA)
    register("t-groups-b", GroupsB)
    register("t-groups-c", GroupsC)
    register("t-lam", Lam)
    spec = "t-groups-a+t-lam+t-groups-b"
    groups = build_strategy(spec, resolve_hparams(spec, {}), "class").param_groups(None)
    # Only parameters both include are trained, each with the options either gives it.
    assert [(g["params"], g.get("lr")) for g in groups] == [([PARAMS[0]], 0.1),
                                                            ([PARAMS[1]], 0.01)]
    one = build_strategy("t-groups-b+t-lam", resolve_hparams("t-groups-b+t-lam", {}), "class")
    assert one.param_groups(None) == GroupsB().param_groups(None)
    spec = "t-groups-b+t-groups-c"
    with pytest.raises(CfbenchError) as excinfo:
        build_strategy(spec, resolve_hparams(spec, {}), "class").param_groups(None)
    text = error_text(excinfo)
    assert "cannot compose GroupsB and GroupsC" in text and "different 'lr' values" in text


def test_strategy_refuses_an_unsupported_setting():
    register("t-task-only", Lam, settings=("task",))
    for spec in ("t-task-only", "naive+t-task-only"):
        with pytest.raises(CfbenchError) as excinfo:
            build_strategy(spec, resolve_hparams(spec, {}), "class")
        text = error_text(excinfo)
        assert "strategy 't-task-only' does not support the class setting" in text
        assert "it supports task" in text
    assert isinstance(build_strategy("t-task-only", {"t-task-only": {}}, "task"), Lam)


def make_batch() -> Batch:
    return Batch(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.tensor([0, 0]))


def test_compose_penalties_add_and_none_is_skipped():
    logits = torch.zeros(2, 3)
    penalty = Compose([Doubles(), NoPenalty(), Increments(), Strategy()]).penalty(
        None, make_batch(), logits)
    assert isinstance(penalty, torch.Tensor) and penalty.item() == pytest.approx(3.5)
    assert Compose([NoPenalty(), Strategy()]).penalty(None, make_batch(), logits) is None
    assert Compose([Increments(), NoPenalty()]).penalty(None, make_batch(), logits).item() == 2.0


def test_compose_batch_hooks_chain_in_order():
    x2_then_plus1 = Compose([Doubles(), Strategy(), Increments()]).batch(None, make_batch())
    plus1_then_x2 = Compose([Increments(), Doubles()]).batch(None, make_batch())
    assert x2_then_plus1.x.tolist() == [3.0, 5.0]
    assert plus1_then_x2.x.tolist() == [4.0, 6.0]
    assert x2_then_plus1.y.tolist() == [0, 1]


# 5. Plugin files

PLUGIN = '''
from cfbench import Strategy, register_strategy


@register_strategy("my-method", family="plugin", reference="Me et al. 2024")
class MyMethod(Strategy):
    """A method from a plugin file."""

    def __init__(self, *, alpha: float = 0.5) -> None:
        self.alpha = alpha
'''


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_load_plugin_registers_its_strategies(tmp_path):
    load_plugin(write(tmp_path / "my-plugin.py", PLUGIN))
    assert registry.strategies.names("my-*") == ["my-method"]
    entry = registry.strategies.get("my-method")
    assert entry.family == "plugin" and entry.factory.__name__ == "MyMethod"
    assert entry.resolve({"alpha": "0.25"}) == {"alpha": 0.25}
    strategy = build_strategy("my-method+ewc", resolve_hparams("my-method+ewc", {}), "task")
    assert isinstance(strategy, Compose) and strategy.parts[0].alpha == 0.5


def test_cli_list_shows_a_plugin_strategy(tmp_path, capsys):
    assert main(["list", "strategies", "my-*", "--plugin",
                 write(tmp_path / "plug.py", PLUGIN)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("my-method") and "[plugin] A method from a plugin file." in lines[0]
    assert "settings: task, domain, class; reference: Me et al. 2024" in lines[1]
    assert "hyperparameters: alpha: float = 0.5" in lines[2]
    assert len(lines) == 3  # only names matching the pattern


def test_cli_list_builtin_strategies(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("naive", "joint", "ewc"):
        assert any(line.startswith(f"{name} ") for line in out.splitlines())
    assert "lam: float = 1000.0" in out
    assert "fisher: sampled|empirical|predicted|all = 'sampled'" in out


def run_cli_error(argv: list[str], capsys) -> str:
    """Run `cfbench` expecting bad input: exit 2 and exactly one line on stderr."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("cfbench: error: ") and "Traceback" not in err
    return err


def test_plugin_that_raises_on_import_is_a_one_line_error(tmp_path, capsys):
    path = write(tmp_path / "broken.py", "import cfbench\nraise RuntimeError('boom')\n")
    err = run_cli_error(["list", "strategies", "--plugin", path], capsys)
    assert err == f"cfbench: error: plugin file {path} failed to import: RuntimeError: boom\n"
    assert "cfbench_plugin_broken" not in sys.modules


def test_plugin_with_a_syntax_error_is_a_one_line_error(tmp_path, capsys):
    path = write(tmp_path / "typo.py", "def oops(:\n")
    err = run_cli_error(["list", "strategies", "--plugin", path], capsys)
    assert f"plugin file {path} failed to import: SyntaxError" in err


def test_plugin_reusing_a_builtin_name_is_refused_in_a_fresh_process(tmp_path):
    """Built-ins register before a plugin file runs, so the clash is blamed on the plugin."""
    path = write(tmp_path / "clash.py", PLUGIN.replace('"my-method"', '"ewc"'))
    proc = subprocess.run([sys.executable, "-m", "cfbench.cli", "list", "strategies", "ewc",
                           "--plugin", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("cfbench: error: duplicate strategy name 'ewc'")
    assert "cfbench.strategies.regularization.EWC" in proc.stderr


def test_missing_plugin_file_exits_2(tmp_path, capsys):
    path = str(tmp_path / "nowhere.py")
    err = run_cli_error(["list", "strategies", "--plugin", path], capsys)
    assert f"plugin file {path} does not exist" in err
    with pytest.raises(CfbenchError, match="does not exist"):
        load_plugin(str(tmp_path))  # a directory is not a plugin file


def test_cli_list_with_no_match_exits_2(capsys):
    err = run_cli_error(["list", "scenarios", "nothing-*"], capsys)
    assert "no scenarios match 'nothing-*'" in err


# 6. Entry points


def install_dist(root: Path, dist: str, entry_point: str, module: str, source: str,
                 version: str = "0.1") -> None:
    """A minimal installed distribution under `root` declaring one cfbench.strategies plugin."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    write(info / "entry_points.txt", f"[cfbench.strategies]\n{entry_point} = {module}\n")
    write(root / f"{module}.py", source)


@pytest.fixture
def reload_plugins(tmp_path, monkeypatch):
    """Put `tmp_path` on sys.path and make the next lookup scan entry points again (what it
    finds broken is forgotten after the test)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry.strategies, "_loaded", False)
    monkeypatch.setattr(registry.strategies, "_broken", [])
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD, raising=False)
    return tmp_path


def test_entry_point_plugin_is_loaded(reload_plugins):
    source = PLUGIN.replace('"my-method"', '"ep-method"')
    install_dist(reload_plugins, "cfbtestplug", "ep-method", "cfb_test_plug", source)
    assert "ep-method" in registry.strategies.names()
    assert registry.strategies.get("ep-method").factory.__module__ == "cfb_test_plug"
    assert {"naive", "joint", "ewc"} <= set(registry.strategies.names())  # built-ins kept


def test_entry_point_that_fails_to_import_is_blamed_when_its_name_is_used(reload_plugins):
    install_dist(reload_plugins, "cfbtestbad", "bad-ep", "cfb_test_bad",
                 "raise ImportError('needs libfoo')\n")
    assert {"naive", "ewc"} <= set(registry.strategies.names())  # the rest still loads
    [broken] = registry.strategies.broken
    assert (broken.package, broken.entry_point, broken.error) == (
        "cfbtestbad", "bad-ep", "ImportError: needs libfoo")
    with pytest.raises(CfbenchError) as excinfo:
        registry.strategies.get("bad-ep")
    assert error_text(excinfo) == (
        "strategy 'bad-ep' comes from plugin package cfbtestbad (entry point 'bad-ep = "
        "cfb_test_bad', group cfbench.strategies), which failed to import: ImportError: needs "
        "libfoo; fix or reinstall cfbtestbad, or uninstall it")
    with pytest.raises(CfbenchError, match=r"unknown strategy 'bad-epp'.*names may be missing "
                                           r"from plugin package cfbtestbad"):
        registry.strategies.get("bad-epp")


def test_disabling_autoload_skips_entry_points(reload_plugins, monkeypatch):
    install_dist(reload_plugins, "cfbtestplug", "ep-method", "cfb_test_plug",
                 PLUGIN.replace('"my-method"', '"ep-method"'))
    monkeypatch.setenv(registry.DISABLE_AUTOLOAD, "1")
    assert "ep-method" not in registry.strategies.names()
    assert "cfb_test_plug" not in sys.modules and "naive" in registry.strategies.names()


def cfbench(args: list[str], path: Path, **env: str) -> subprocess.CompletedProcess:
    """`cfbench ARGS` in a fresh process whose PYTHONPATH holds `path` (its installed
    distributions: what `pip install` would have put on sys.path)."""
    base = {k: v for k, v in os.environ.items() if k != registry.DISABLE_AUTOLOAD}
    paths = os.pathsep.join(filter(None, [str(path), base.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "cfbench.cli", *args], capture_output=True,
                          text=True, timeout=300,
                          env={**base, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", **env})


def test_a_broken_plugin_package_warns_until_a_run_names_it(tmp_path, digits_root):
    """A real installed distribution whose entry point raises on import: every command that
    does not need it works and ends with one warning naming the package and the error; naming
    its strategy is one error line; CFBENCH_DISABLE_PLUGIN_AUTOLOAD skips it."""
    site = tmp_path / "site"
    install_dist(site, "cfbench-broken", "broken-method", "cfb_test_broken",
                 "raise ImportError('needs libfoo')\n", version="1.2")
    warning = ("cfbench: warning: skipped plugin package cfbench-broken (entry point "
               "'broken-method = cfb_test_broken', group cfbench.strategies), which failed to "
               "import: ImportError: needs libfoo; fix or uninstall it, or set "
               "CFBENCH_DISABLE_PLUGIN_AUTOLOAD=1 to skip plugin packages\n")

    listed = cfbench(["list", "strategies"], site)
    assert listed.returncode == 0 and listed.stderr == warning
    assert "naive " in listed.stdout and "broken-method" not in listed.stdout

    run = ["run", "--scenario", "split-digits", "--setting", "class", "--iterations", "2",
           "--data-root", str(digits_root), "--out", str(tmp_path / "runs"), "--quiet"]
    ran = cfbench([*run, "--strategy", "naive"], site)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.endswith(warning) and ran.stderr.count("\n") == 2  # the summary, it
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1

    named = cfbench([*run, "--strategy", "naive,broken-method"], site)
    assert named.returncode == 2 and named.stdout == ""
    assert named.stderr == (
        "cfbench: error: strategy 'broken-method' comes from plugin package cfbench-broken "
        "(entry point 'broken-method = cfb_test_broken', group cfbench.strategies), which "
        "failed to import: ImportError: needs libfoo; fix or reinstall cfbench-broken, or "
        "uninstall it\n")

    quiet = cfbench(["list", "strategies", "naive"], site, CFBENCH_DISABLE_PLUGIN_AUTOLOAD="1")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("naive ")


# 7. Where each name comes from


def test_every_record_names_where_its_strategies_came_from(reload_plugins, digits_root,
                                                          capsys):
    """Built-in, an installed package's entry point (name and version), a plugin file (path
    and hash): in `cfbench list` and in each record's env, never in the config (run ids)."""
    install_dist(reload_plugins, "cfbtest-plug", "ep-method", "cfb_test_plug",
                 PLUGIN.replace('"my-method"', '"ep-method"'), version="1.2")
    plugin = write(reload_plugins / "files" / "mine.py", PLUGIN)
    from_file = (f"plugin file {Path(plugin).resolve()} "
                 f"sha256:{hashlib.sha256(Path(plugin).read_bytes()).hexdigest()}")
    from_package = "cfbtest-plug 1.2 (entry point)"
    for name, source in [("naive", "built-in"), ("ep-method", from_package),
                         ("my-method", from_file)]:
        assert main(["list", "strategies", name, "--plugin", plugin]) == 0
        assert capsys.readouterr().out.splitlines()[1].endswith(f"; source: {source}")

    out = reload_plugins / "runs"
    assert main(["run", "--scenario", "split-digits", "--setting", "class", "--iterations", "2",
                 "--strategy", "ewc,ep-method+my-method", "--plugin", plugin, "--out", str(out),
                 "--data-root", str(digits_root), "--quiet"]) == 0
    records = {r.config["strategy"]: r for r in read_records(out)}
    assert records["ewc"].env["strategy_sources"] == {"ewc": "built-in"}
    assert records["ep-method+my-method"].env["strategy_sources"] == {
        "ep-method": from_package, "my-method": from_file}
    for record in records.values():
        assert record.env["scenario_source"] == "built-in"
        assert record.run_id == RunConfig.from_dict(record.config).run_id
        assert "sha256" not in json.dumps(record.config)
        # A record written before sources were kept is still read.
        old = json.loads(record.to_json())
        del old["env"]["strategy_sources"], old["env"]["scenario_source"]
        assert parse_record(json.dumps(old), "old record").env == {
            k: v for k, v in record.env.items() if not k.endswith(("_sources", "_source"))}


# 8. --hp parsing


def test_parse_hparams_scoped_key():
    assert parse_hparams(["ewc.lam=5"], ["ewc+naive"]) == {"ewc": {"lam": "5"}}
    assert parse_hparams([], ["ewc"]) == {}


def test_parse_hparams_bare_key_goes_to_every_declaring_strategy():
    register("t-lam", Lam)
    parsed = parse_hparams(["lam=0.5", "ewc.fisher=empirical"], ["ewc", "naive+t-lam"])
    assert parsed == {"ewc": {"lam": "0.5", "fisher": "empirical"}, "t-lam": {"lam": "0.5"}}
    resolved = resolve_hparams("ewc+t-lam", parsed)
    assert resolved["ewc"]["lam"] == 0.5 and resolved["t-lam"] == {"lam": 0.5}
    assert resolved["ewc"]["fisher"] == "empirical"


def test_parse_hparams_keeps_the_rest_of_the_value():
    assert parse_hparams(["ewc.fisher=a=b"], ["ewc"]) == {"ewc": {"fisher": "a=b"}}


def test_parse_hparams_bare_key_nobody_declares():
    with pytest.raises(CfbenchError) as excinfo:
        parse_hparams(["zeta=1"], ["ewc", "naive"])
    text = error_text(excinfo)
    assert "unknown hyperparameter 'zeta': none of ewc, naive declares it" in text
    assert "cfbench list strategies" in text


@pytest.mark.parametrize("item", ["lam", "=5", ""])
def test_parse_hparams_needs_key_and_value(item):
    with pytest.raises(CfbenchError) as excinfo:
        parse_hparams([item], ["ewc"])
    assert f"bad --hp '{item}': write KEY=VALUE or STRATEGY.KEY=VALUE" in error_text(excinfo)
