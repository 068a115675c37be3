"""The defences by name: every `Defense` registered in the entry-point group `safemerge.defenses`.

The built-in defences are registered there by safemerge's own pyproject.toml, exactly as another
installed package registers its own (`[project.entry-points."safemerge.defenses"] NAME = "module:OBJECT"`).
Listing names reads package metadata only; a defence's module is imported when it is first used, and a
plugin that fails to import, or is not a `Defense`, is an `InputError` naming it (exit code 2).
"""

from __future__ import annotations

import functools

from safemerge.common.errors import InputError
from safemerge.common.plugins import clear_plugin_cache, entry_point, load_plugin, plugin_label, plugin_names
from safemerge.defenses.base import Defense

GROUP = "safemerge.defenses"


def defense_names() -> list[str]:
    """The registered defences' names, sorted (reads package metadata, imports nothing)."""
    return plugin_names(GROUP)


@functools.cache
def get_defense(name: str) -> Defense:
    """The defence registered as `name`, imported on first use; InputError if unknown or broken."""
    obj: Defense = load_plugin(GROUP, name, Defense, "defence")
    if getattr(obj, "name", None) != name or getattr(obj, "output", None) not in ("adapter", "model"):
        raise InputError(
            f"{plugin_label('defence', entry_point(GROUP, name))}: its name must be {name!r} (got "
            f"{getattr(obj, 'name', None)!r}) and its output 'adapter' or 'model' (got "
            f"{getattr(obj, 'output', None)!r})"
        )
    return obj


def clear_cache() -> None:
    """Forget the registered defences (after installing a plugin in-process, e.g. in tests)."""
    clear_plugin_cache()
    get_defense.cache_clear()
