"""The plugin host: discovers entry-point plugins and indexes what they provide.

Built-in plugins and third-party ones are found the same way, through the ``moebench``
entry-point group. A plugin that fails to import is remembered with its error (shown by
``moebench plugins``) and the others still load.
"""

from __future__ import annotations

import importlib.metadata as md
import traceback
from dataclasses import dataclass, field
from functools import lru_cache

import pluggy

from . import hookspecs
from .errors import MoebenchError, did_you_mean

GROUP = "moebench"


@dataclass
class PluginInfo:
    """One entry point: where it came from and what it provides (or why it failed)."""

    name: str
    module: str
    distribution: str
    version: str
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    #: the import error's traceback, for debugging a broken plugin
    traceback: str | None = None


class Host:
    """A loaded set of plugins, with lookups by name for each kind of thing they provide."""

    def __init__(self, extra: list[object] = ()):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            info = PluginInfo(ep.name, ep.value, dist, version)
            try:
                module = ep.load()
                self.pm.register(module, name=f"{dist}:{ep.name}")
                self._collect(info, module)
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"{type(exc).__name__}: {exc}"
                info.traceback = traceback.format_exc()
            self.plugins.append(info)
        for obj in extra:
            self.pm.register(obj)
            self._collect(PluginInfo(getattr(obj, "__name__", repr(obj)), "", "", ""), obj)

    def _collect(self, info: PluginInfo, module) -> None:
        for kind in ("methods", "metrics", "adapters", "data_sources", "statistics", "suite_tables", "module_classes"):
            impl = getattr(module, f"register_{kind}", None)
            if impl is not None:
                info.provides[kind] = [_name_of(c) for c in impl()]

    def _index(self, kind: str, key) -> dict[str, type]:
        found: dict[str, type] = {}
        for group in getattr(self.pm.hook, f"register_{kind}")():
            for cls in group or ():
                found[key(cls)] = cls
        return found

    @property
    def methods(self) -> dict[str, type]:
        return self._index("methods", _name_of)

    @property
    def metrics(self) -> dict[str, type]:
        return self._index("metrics", _name_of)

    @property
    def adapters(self) -> dict[str, type]:
        return self._index("adapters", _name_of)

    @property
    def data_sources(self) -> dict[str, type]:
        return self._index("data_sources", lambda c: c.scheme)

    @property
    def statistics(self) -> dict[str, type]:
        return self._index("statistics", _name_of)

    @property
    def module_classes(self) -> dict[str, type]:
        """The module classes saved models may name, keyed by ``module:Class`` (and each ``class_path``)."""
        found: dict[str, type] = {}
        for group in self.pm.hook.register_module_classes():
            for cls in group or ():
                found[f"{cls.__module__}:{cls.__qualname__}"] = cls
                if getattr(cls, "class_path", None):
                    found[cls.class_path] = cls
        return found

    @property
    def suite_tables(self) -> dict:
        """Top-level suite tables plugins own: name -> :class:`moebench.suite.SuiteTable`."""
        return self._index("suite_tables", _name_of)

    def method(self, name: str):
        methods = self.methods
        if name not in methods and self.broken():
            raise MoebenchError(f"unknown method {name!r}{did_you_mean(name, methods)}{self.broken_hint()}")
        return _lookup(methods, name, "method")

    def broken_hint(self) -> str:
        """``; plugins that failed to load (and may provide it): NAME (module): ERROR`` or ``''``."""
        broken = self.broken()
        if not broken:
            return ""
        return "; plugin(s) that failed to load and may provide it: " + "; ".join(
            f"{p.name} ({p.module}): {p.error}" for p in broken
        )

    def metric(self, name: str):
        return _lookup(self.metrics, name, "metric")

    def data_source(self, scheme: str):
        return _lookup(self.data_sources, scheme, "data source scheme")()

    def statistic(self, name: str):
        return _lookup(self.statistics, name, "calibration statistic")

    def adapter_for(self, model_or_config):
        """The adapter whose ``model_types`` include the model's ``config.model_type``."""
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        for cls in self.adapters.values():
            if model_type in cls.model_types:
                return cls()
        known = sorted(t for cls in self.adapters.values() for t in cls.model_types)
        raise MoebenchError(
            f"unsupported architecture {model_type!r}: no adapter plugin handles it "
            f"(supported: {', '.join(known)}); write an adapter plugin to add one"
        )

    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def notify(self, hook: str, **kwargs) -> None:
        getattr(self.pm.hook, hook)(**kwargs)


def _entry_points():
    return md.entry_points(group=GROUP)


def _name_of(cls) -> str:
    return getattr(cls, "name", None) or getattr(cls, "scheme", None) or cls.__name__


def _lookup(table: dict[str, type], name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise MoebenchError(
            f"unknown {what} {name!r}{did_you_mean(name, table)}; known: {', '.join(sorted(table)) or 'none'}"
        ) from None


@lru_cache(maxsize=1)
def host() -> Host:
    """The process-wide plugin host (built once, on first use)."""
    return Host()
