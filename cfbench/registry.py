"""Name -> factory registries for strategies and scenarios, with typed hyperparameters.

A strategy is a class and a scenario a function; both are registered with a decorator that
records metadata (family, reference, supported settings). Their hyperparameters are the typed
keyword arguments of the class's ``__init__`` (or of the function), so the signature is the one
place a hyperparameter is declared: name, type and default. Built-ins are imported lazily on the
first lookup, then third-party packages through entry points (``cfbench.strategies`` /
``cfbench.scenarios``), whose import registers their names. A package that fails to import is
a warning, not an error, until a run names one of its names: one broken install must not take
every command down. Each name keeps its source (built-in, a package's entry point, a plugin
file and its hash), which every run record names.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from cfbench.errors import CfbenchError

SETTINGS = ("task", "domain", "class")
"""Task-incremental (task label at test), domain-incremental (shared within-task labels) and
class-incremental (one head over all classes, no task label)."""

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}

F = TypeVar("F", bound=Callable[..., Any])

DISABLE_AUTOLOAD = "CFBENCH_DISABLE_PLUGIN_AUTOLOAD"
"""Set to a non-empty value, installed plugin packages (entry points) are not imported, as
pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD; `--plugin` files still are."""

BUILT_IN = "built-in"
"""The source of the names cfbench itself registers."""

_importing: list[str] = []
"""The source of the plugin being imported (innermost last): what `register` records."""


@contextlib.contextmanager
def _importing_from(source: str) -> Iterator[None]:
    _importing.append(source)
    try:
        yield
    finally:
        _importing.pop()


def _source_of(factory: Callable[..., Any]) -> str:
    """Where a name being registered comes from: cfbench's own modules (whoever imports them),
    the plugin being imported, else the factory's module (a name registered in a session)."""
    module = factory.__module__
    if module.split(".")[0] == "cfbench":
        return BUILT_IN
    return _importing[-1] if _importing else f"module {module}"


@dataclass(frozen=True)
class HyperParam:
    """One typed keyword argument of a strategy or scenario, with its default."""

    name: str
    type: Any
    default: Any

    @property
    def type_name(self) -> str:
        if typing.get_origin(self.type) is Literal:
            return "|".join(str(c) for c in typing.get_args(self.type))
        return getattr(self.type, "__name__", str(self.type).replace("typing.", ""))

    def coerce(self, value: Any, owner: str, word: str = "hyperparameter", flag: str = "--hp"
               ) -> Any:
        """Return `value` as this parameter's type (parsing strings), or raise CfbenchError."""
        try:
            return _coerce(self.type, value)
        except (TypeError, ValueError) as exc:
            raise CfbenchError(
                f"bad value {value!r} for {word} '{self.name}' of {owner}: expected "
                f"{self.type_name} ({exc}); e.g. {flag} {self.name}={self.default!r}"
            ) from None


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for choice in args:  # from the command line every value arrives as a string
            if value == choice or str(value) == str(choice):
                return choice
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() == "none"):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], item.strip() if isinstance(item, str) else item)
                     for item in items if item != "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError("use true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("not an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("not a number")
        try:
            result = float(value)
        except OverflowError:  # an integer beyond a float's range
            result = math.inf
        if not math.isfinite(result):  # a run would diverge, and JSON has no such number
            raise ValueError(f"{result} is not allowed: give a finite number")
        return result
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported hyperparameter type {tp!r}")


@dataclass(frozen=True)
class Entry:
    """A registered strategy or scenario: its factory and what the listing shows of it."""

    name: str
    factory: Callable[..., Any]
    kind: str
    family: str
    reference: str
    settings: tuple[str, ...]
    hparams: tuple[HyperParam, ...]
    source: str = BUILT_IN
    """Where the name comes from: "built-in", "NAME VERSION (entry point)" of an installed
    package, "plugin file PATH sha256:HEX" of a `--plugin` file, or "module NAME"."""

    @property
    def summary(self) -> str:
        """The docstring's first sentence, however many lines it wraps over."""
        paragraph = (inspect.getdoc(self.factory) or "").strip().split("\n\n")[0]
        text = " ".join(paragraph.split())
        end = text.find(". ")
        return text if end < 0 else text[:end + 1]

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `given`, each value checked and coerced to its declared type.
        Those the factory lists in `LATER_HPARAMS` (added after runs of it were recorded) are
        left out at their defaults, so the ids of those runs stay valid (as protocol fields
        added later are, ``Protocol.to_dict``)."""
        known = {hp.name: hp for hp in self.hparams}
        later = getattr(self.factory, "LATER_HPARAMS", ())
        word, flag = (("option", "--option") if self.kind == "scenario"
                      else ("hyperparameter", "--hp"))
        for key in given:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                valid = ", ".join(known) or "none"
                raise CfbenchError(
                    f"unknown {word} '{key}' for {self.kind} '{self.name}'{hint}; "
                    f"valid: {valid}"
                )
        resolved = {
            name: hp.coerce(given[name], f"{self.kind} '{self.name}'", word, flag)
            if name in given else hp.default
            for name, hp in known.items()
        }
        return {name: value for name, value in resolved.items()
                if not (name in later and value == known[name].default)}


def _hparams_of(factory: Callable[..., Any], reserved: tuple[str, ...]) -> tuple[HyperParam, ...]:
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    params = []
    for name, param in inspect.signature(factory).parameters.items():
        if name in reserved:
            continue
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            # Positional hyperparameters would make `--hp` order-dependent.
            raise TypeError(f"{factory.__qualname__}: hyperparameter '{name}' must be keyword-only")
        if param.default is inspect.Parameter.empty or name not in hints:
            raise TypeError(f"{factory.__qualname__}: hyperparameter '{name}' needs a type and a "
                            "default")
        tp = hints[name]
        try:
            _coerce(tp, param.default)
        except ValueError as exc:
            raise TypeError(f"{factory.__qualname__}: default {param.default!r} of '{name}' does "
                            f"not fit its type ({exc})") from None
        params.append(HyperParam(name, tp, param.default))
    return tuple(params)


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin package whose entry point failed to import."""

    package: str
    entry_point: str
    """Its name: by convention the name it registers, or the prefix of its names (``avalanche``
    registers ``avalanche:*``)."""
    value: str
    group: str
    error: str

    def provides(self, name: str) -> bool:
        """Whether `name` would have been its (by the convention above)."""
        return name == self.entry_point or name.startswith(f"{self.entry_point}:")

    def __str__(self) -> str:
        return (f"plugin package {self.package} (entry point '{self.entry_point} = "
                f"{self.value}', group {self.group}), which failed to import: {self.error}")


class Registry:
    """Names of one kind (strategies or scenarios), filled by decorators and entry points."""

    def __init__(self, kind: str, plural: str, builtin_package: str, group: str,
                 reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.plural = plural
        self._builtin_package = builtin_package
        self._group = group
        self._reserved = reserved
        self._entries: dict[str, Entry] = {}
        self._broken: list[BrokenPlugin] = []
        self._loaded = False

    def register(self, name: str, *, family: str = "other", reference: str = "",
                 settings: tuple[str, ...] = SETTINGS) -> Callable[[F], F]:
        """Decorator that registers a class or function under `name`."""
        if "+" in name.rstrip("+") or not name.strip("+ "):
            raise ValueError(f"invalid {self.kind} name {name!r}: '+' composes strategies, so a "
                             "name may only end in '+' (like der++)")
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; use {SETTINGS}")

        def decorate(factory: F) -> F:
            if name in self._entries:
                other = self._entries[name].factory
                raise CfbenchError(
                    f"duplicate {self.kind} name '{name}': already registered by "
                    f"{other.__module__}.{other.__qualname__}; pick another name"
                )
            self._entries[name] = Entry(name, factory, self.kind, family, reference,
                                        tuple(settings), _hparams_of(factory, self._reserved),
                                        _source_of(factory))
            return factory

        return decorate

    def load(self) -> None:
        """Import the built-ins and every installed plugin package (once; none with
        CFBENCH_DISABLE_PLUGIN_AUTOLOAD set). A package that fails to import is kept in
        `broken` (the command line warns of it once the command is done); its names are then
        unknown, and `get` blames the package."""
        if self._loaded:
            return
        importlib.import_module(self._builtin_package)
        self._loaded, self._broken = True, []
        if os.environ.get(DISABLE_AUTOLOAD):
            return
        for ep in entry_points(group=self._group):
            dist = ep.dist  # the installed package declaring it (`entry_points` sets it)
            try:
                with _importing_from(f"{dist.name} {dist.version} (entry point)"):
                    ep.load()
            except Exception as exc:
                self._broken.append(BrokenPlugin(
                    dist.name, ep.name, ep.value, self._group,
                    f"{type(exc).__name__}: {exc}".replace("\n", " ")))

    @property
    def broken(self) -> tuple[BrokenPlugin, ...]:
        """Installed plugin packages of this kind that failed to import (so far: none before
        the first lookup)."""
        return tuple(self._broken)

    def get(self, name: str) -> Entry:
        self.load()
        if name not in self._entries:
            for broken in self._broken:
                if broken.provides(name):
                    raise CfbenchError(f"{self.kind} '{name}' comes from {broken}; fix or "
                                       f"reinstall {broken.package}, or uninstall it")
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            note = "".join(f" (names may be missing from {b})" for b in self._broken)
            raise CfbenchError(
                f"unknown {self.kind} '{name}'{hint}; see `cfbench list {self.plural}`{note}"
            )
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        self.load()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def unregister(self, name: str) -> None:
        """Remove a name (tests and interactive sessions that redefine a plugin)."""
        self._entries.pop(name, None)


strategies = Registry("strategy", "strategies", "cfbench.strategies", "cfbench.strategies")
scenarios = Registry("scenario", "scenarios", "cfbench.scenarios", "cfbench.scenarios",
                     reserved=("data_root", "seed"))

register_strategy = strategies.register
register_scenario = scenarios.register


def load_plugin(path: str) -> None:
    """Import a user's Python file so its @register_* decorators run (the same file twice
    registers once)."""
    file = Path(path)
    if not file.is_file():
        raise CfbenchError(f"plugin file {path} does not exist")
    strategies.load()
    scenarios.load()
    name = f"cfbench_plugin_{file.stem.replace('-', '_')}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(loaded.__file__ or "").resolve() == file.resolve():
        return
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise CfbenchError(f"plugin file {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    try:
        with _importing_from(f"plugin file {file.resolve()} sha256:{digest}"):
            spec.loader.exec_module(module)
    except CfbenchError:
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise CfbenchError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}"
                           ) from None
