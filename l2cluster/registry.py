"""Plugin discovery and registration: finds regularizers, checks each against the hook contract, refuses bad ones.

Sources, in this order: the built-ins (the repo's `plugins/`, installed as `l2cluster.plugins`), the entry-point
group `l2cluster.regularizers` of installed packages, and plugin directories named by the operator (daemon
configuration or `--plugin-dir`). Never a path inside a job spec. A plugin that fails to import is listed as
unavailable with its reason; a plugin that breaks the contract is refused with an error naming plugin, hook
and argument; every other plugin still loads.

Every plugin carries the version of its code, which becomes part of the ids of the jobs that use it: the
l2cluster version for a built-in, the distribution's version for an entry point, the sha256 of the file for a
plugin directory's file. `current_version` reads it from disk again, to notice code that changed after loading.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, create_model

import l2cluster
from l2cluster.errors import NotFoundError
from l2cluster.plugin import HOOK_ARGS, HOOK_MARK, PluginError, Regularizer

ENTRY_POINT_GROUP = "l2cluster.regularizers"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class PluginChangedError(PluginError):
    """A job would run plugin code other than what the daemon loaded: its file or package changed on disk, or
    the submitting client has another version of it. The message says which versions and how to fix it."""


@dataclass
class HookImpl:
    """One validated hook of a plugin: the bound method and the arguments it takes."""

    fn: Callable
    args: tuple[str, ...]

    def __call__(self, **offered):
        return self.fn(**{a: offered[a] for a in self.args})


@dataclass
class PluginInfo:
    """A plugin as the registry knows it: loaded and usable (status "ok"), refused, or unavailable."""

    name: str
    origin: str
    status: Literal["ok", "refused", "unavailable"]
    reason: str = ""
    hooks: dict[str, HookImpl] = field(default_factory=dict)
    config_model: type[BaseModel] | None = None
    cls: type | None = None
    version: str = ""
    """The version of the plugin's code (part of job ids): "0.2.0", or "sha256:<16 hex>" for a directory file."""
    path: str | None = None  # the file of a plugin directory's plugin
    dist: str | None = None  # the distribution of an entry point's plugin


class Registry:
    """The loaded regularizer plugins of one process."""

    def __init__(self) -> None:
        self._plugins: dict[str, PluginInfo] = {}
        self.problems: list[PluginInfo] = []

    # -- registration ---------------------------------------------------------------------------------------
    def register(self, cls: object, origin: str, version: str = "", *, path: str | None = None,
                 dist: str | None = None) -> PluginInfo:
        """Validate `cls` against the contract and add it; raises PluginError saying what to fix.

        `version` is the version of its code (see the module docstring); `path` or `dist` say where to read it
        again (`current_version`)."""
        name = getattr(cls, "name", None)
        label = name if isinstance(name, str) and name else getattr(cls, "__name__", repr(cls))
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise PluginError(label, f"{cls!r} is not a subclass of l2cluster.plugin.Regularizer")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                label, f"class attribute `name` must be a lower-case identifier such as 'l2', got {name!r}"
            )
        if name in self._plugins:
            raise PluginError(
                name, f"a plugin named {name!r} is already registered from {self._plugins[name].origin}; "
                "rename one of them"
            )
        config_model = _check_config(name, cls)
        hooks = _check_hooks(name, cls)
        info = PluginInfo(name, origin, "ok", hooks=hooks, config_model=config_model, cls=cls, version=version,
                          path=path, dist=dist)
        self._plugins[name] = info
        return info

    def add_problem(self, name: str, origin: str, status: Literal["refused", "unavailable"], reason: str) -> None:
        self.problems.append(PluginInfo(name, origin, status, reason))

    def register_or_record(self, cls: object, origin: str, version: str = "", **source) -> None:
        try:
            self.register(cls, origin, version, **source)
        except PluginError as e:
            self.add_problem(e.plugin, origin, "refused", str(e))

    # -- lookup ---------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._plugins)

    def get(self, name: str) -> PluginInfo:
        try:
            return self._plugins[name]
        except KeyError:
            for p in self.problems:
                if p.name == name:
                    raise NotFoundError(f"plugin {name!r} is {p.status}: {p.reason}") from None
            raise NotFoundError(f"no plugin named {name!r}; available: {', '.join(self.names) or 'none'}") from None

    def all(self) -> list[PluginInfo]:
        return [*self._plugins.values(), *self.problems]

    def config_union(self):
        """The type of one `regularizers` entry: the plugins' configs, discriminated by `name`."""
        models = tuple(p.config_model for p in self._plugins.values())
        if not models:
            return None
        if len(models) == 1:
            return models[0]
        return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)


def _check_config(name: str, cls: type) -> type[BaseModel]:
    config = cls.__dict__.get("Config", getattr(cls, "Config", None))
    if config is None:
        raise PluginError(name, "has no `Config`; add a nested pydantic model `class Config(BaseModel)`")
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(name, f"`Config` must be a pydantic BaseModel subclass, got {config!r}")
    if config.model_config.get("extra") != "forbid":
        raise PluginError(
            name, "`Config` must refuse unknown fields so typos in job specs fail loudly: "
            "set model_config = ConfigDict(extra='forbid', use_attribute_docstrings=True)"
        )
    if "name" in config.model_fields:
        raise PluginError(name, "`Config` must not define the field `name`: the registry adds it")
    return _entry_model(name, cls, config)


@functools.cache
def _entry_model(name: str, cls: type, config: type[BaseModel]) -> type[BaseModel]:
    # The spec's regularizer entries are discriminated by `name`; the plugin's Config gets that field here.
    # Built once per plugin class and process: reading the field docstrings from the source is the slow part of
    # loading a registry, and every CLI command loads one.
    return create_model(
        f"{type_name(name)}Config",
        __base__=config,
        __doc__=(config.__doc__ or cls.__doc__ or "").strip() or None,
        # type-check: pydantic's typing of models built at run time
        name=(Literal[name], Field(description=f"Selects the {name!r} regularizer.")),  # type: ignore[arg-type]
    )


def type_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _check_hooks(name: str, cls: type) -> dict[str, HookImpl]:
    """Every public method of the plugin (its own and inherited, but not Regularizer's), and every method marked
    with `@hook`, must be a hook: a misspelt hook would otherwise never be called, silently. Helpers are
    `_private`; nested classes (Config, an exception type) are not methods."""
    try:
        instance = cls()
    except Exception as e:
        raise PluginError(name, f"could not be instantiated without arguments: {_import_error(e)}") from None
    hooks: dict[str, HookImpl] = {}
    # Names in the order the classes define them (bases first); each checked as the plugin class resolves it.
    names = dict.fromkeys(a for k in reversed(cls.__mro__) if k not in (object, Regularizer) for a in vars(k))
    for attr in names:
        value = inspect.getattr_static(cls, attr)
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if not callable(fn) or isinstance(fn, type):
            continue
        if attr.startswith("_") and not getattr(fn, HOOK_MARK, False):
            continue
        if attr not in HOOK_ARGS:
            close = difflib.get_close_matches(attr, HOOK_ARGS, n=1)
            hooks_are = f"did you mean {close[0]!r}? Hooks are" if close else "hooks are"
            raise PluginError(
                name, f"is not a hook; {hooks_are} {', '.join(HOOK_ARGS)}; name helper methods with a leading "
                "underscore", hook=attr,
            )
        hooks[attr] = _check_signature(name, attr, getattr(instance, attr))
    if not hooks:
        raise PluginError(name, f"implements no hook; implement at least one of {', '.join(HOOK_ARGS)}")
    return hooks


def _check_signature(name: str, hook: str, method: Callable) -> HookImpl:
    allowed = HOOK_ARGS[hook]
    args = []
    for p in inspect.signature(method).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PluginError(
                name, f"takes *{p.name}; name the arguments it uses instead (any of {', '.join(allowed)})",
                hook=hook, argument=p.name,
            )
        if p.name not in allowed:
            raise PluginError(
                name, f"the trainer does not offer this argument; {hook} can take {', '.join(allowed)}",
                hook=hook, argument=p.name,
            )
        args.append(p.name)
    return HookImpl(method, tuple(args))


# -- discovery ----------------------------------------------------------------------------------------------
def _classes_in(module) -> list[type]:
    return [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Regularizer) and obj is not Regularizer
        and obj.__module__ == module.__name__
    ]


def _import_error(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def file_version(path: str | Path) -> str:
    """The version of a plugin directory's file: the sha256 of its bytes ("missing" once it is gone)."""
    try:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def current_version(info: PluginInfo) -> str:
    """The version of `info`'s code on disk now; it differs from `info.version` when the file or the installed
    package changed after this process loaded it. A built-in is part of the running l2cluster."""
    if info.path is not None:
        return file_version(info.path)
    if info.dist is not None:
        try:
            return importlib.metadata.version(info.dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    return info.version


def code_location(info: PluginInfo) -> str:
    """Where a plugin's code is, for messages: its file, its package, or l2cluster itself."""
    if info.path is not None:
        return info.path
    if info.dist is not None:
        return f"package {info.dist}"
    return "built into l2cluster"


def versions(registry: Registry, names: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """{name: (version, where its code is)} of the usable plugins (those in `names`, if given): what a client
    sends with a submission, so that the daemon can tell whether both mean the same code."""
    infos = [registry.get(n) for n in names if n in registry.names] if names is not None else registry.all()
    return {p.name: (p.version, code_location(p)) for p in infos if p.status == "ok"}


def check_unchanged(registry: Registry, names: Iterable[str], client: dict[str, tuple[str, str]] | None = None,
                    *, restart: str) -> None:
    """Raise PluginChangedError when a plugin in `names` is no longer the code this registry loaded: its file or
    package changed on disk since, or the client (its `versions`) has another version of it. `restart` is the
    command that loads it again."""
    for name in sorted(set(names)):
        info = registry.get(name)
        now = current_version(info)
        if now != info.version:
            raise PluginChangedError(
                name, f"changed since the daemon loaded it ({info.version} → {now}, {code_location(info)}); "
                f"restart the daemon to load it: {restart}")
        theirs = (client or {}).get(name)
        if theirs is not None and tuple(theirs)[0] != info.version:
            version, location = theirs
            raise PluginChangedError(
                name, f"this client has version {version} ({location}) but the daemon loaded {info.version} "
                f"({code_location(info)}); use the same code on both: restart the daemon to load this version "
                f"({restart}), or install the daemon's version here")


def load_builtins(registry: Registry) -> None:
    import l2cluster.plugins as builtins

    for mod in pkgutil.iter_modules(builtins.__path__):
        if mod.name.startswith("_"):
            continue
        origin = f"builtin ({builtins.__name__}.{mod.name})"
        try:
            module = importlib.import_module(f"{builtins.__name__}.{mod.name}")
        except Exception as e:  # a broken built-in must not take the others down
            registry.add_problem(mod.name, origin, "unavailable", f"import failed: {_import_error(e)}")
            continue
        for cls in _classes_in(module):
            registry.register_or_record(cls, origin, l2cluster.__version__)


def load_entry_points(registry: Registry) -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.value}" + (f" (package {dist.name})" if dist else "")
        try:
            cls = ep.load()
        except Exception as e:
            registry.add_problem(ep.name, origin, "unavailable", f"import failed: {_import_error(e)}")
            continue
        if dist is not None:
            registry.register_or_record(cls, origin, dist.version, dist=dist.name)
        else:
            registry.register_or_record(cls, origin, "unknown")


def load_directory(registry: Registry, directory: str | Path) -> None:
    """Load every `*.py` file of an operator-named plugin directory as its own module."""
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        registry.add_problem(str(directory), f"directory {directory}", "unavailable", "directory does not exist")
        return
    tag = hashlib.sha1(str(directory).encode()).hexdigest()[:8]
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        origin = f"directory {path}"
        # Hashed before it runs: the version names the code that was loaded, even if the file changes meanwhile.
        version = file_version(path)
        module_name = f"l2cluster_plugindir_{tag}_{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"{path} cannot be imported as a module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            registry.add_problem(path.stem, origin, "unavailable", f"import failed: {_import_error(e)}")
            continue
        for cls in _classes_in(module):
            registry.register_or_record(cls, origin, version, path=str(path))


def load_registry(plugin_dirs: Iterable[str | Path] = (), *, use_entry_points: bool = True) -> Registry:
    """Discover and register every plugin: built-ins, then entry points, then the given directories."""
    registry = Registry()
    load_builtins(registry)
    if use_entry_points:
        load_entry_points(registry)
    for d in plugin_dirs:
        load_directory(registry, d)
    return registry
