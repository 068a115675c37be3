"""Plugins by entry point: the one lookup behind the defence, benchmark and judge registries.

Built-ins and third-party plugins register the same way (`[project.entry-points."GROUP"] NAME =
"module:OBJECT"` in a pyproject.toml); the entry point's name is the name users type. Listing names reads
package metadata only and imports nothing, so a broken plugin never breaks `--help` or other commands;
loading one that fails to import, or is not what its group expects, is an `InputError` naming the plugin
(exit code 2), not a traceback.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from safemerge.common.errors import InputError


@functools.cache
def _entry_points(group: str) -> tuple[EntryPoint, ...]:
    return tuple(entry_points(group=group))


def plugin_names(group: str) -> list[str]:
    """The names registered in `group`, sorted."""
    return sorted({ep.name for ep in _entry_points(group)})


def load_plugin(group: str, name: str, kind: type, what: str, unknown_hint: str = "") -> Any:
    """The object registered as `name` in `group`, which must be an instance of `kind`.

    `what` names the kind of plugin in messages ("defence", "benchmark"); `unknown_hint` replaces the
    list of known names in the message for an unknown name.
    """
    found = {ep.value: ep for ep in _entry_points(group) if ep.name == name}
    if not found:
        hint = unknown_hint or f"registered {what}s are {', '.join(plugin_names(group))}"
        raise InputError(f"unknown {what} {name!r}: {hint}")
    if len(found) > 1:
        raise InputError(f"{what} {name!r} is registered twice, by {' and '.join(sorted(found))}")
    (ep,) = found.values()
    try:
        obj: Any = ep.load()
    except Exception as exc:  # any failure inside a plugin's import is the plugin's, not ours
        raise InputError(f"{plugin_label(what, ep)} failed to load: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, kind):
        raise InputError(
            f"{plugin_label(what, ep)} is not a {kind.__module__}.{kind.__name__} (got {type(obj).__name__})"
        )
    return obj


def plugin_label(what: str, ep: EntryPoint) -> str:
    """`defence plugin 'shrink' (shrink_plugin:DEFENSE)`: how messages name a plugin."""
    return f"{what} plugin {ep.name!r} ({ep.value})"


def entry_point(group: str, name: str) -> EntryPoint:
    """The (single) entry point registered as `name` in `group`, for messages after loading."""
    return next(ep for ep in _entry_points(group) if ep.name == name)


def clear_plugin_cache() -> None:
    """Forget the registered entry points (after installing a plugin in-process, e.g. in tests)."""
    _entry_points.cache_clear()
