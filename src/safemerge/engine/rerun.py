"""Resolved configs that rerun from any working directory (`safemerge.yaml`, `defense.yaml`,
`train_config.yaml`; README, "Outputs of `merge`").

A resolved config records each input so that `safemerge merge -c OUT/safemerge.yaml --out NEW` reads the
same files wherever it is run: a local path is written absolute (symbolic links resolved), while a hub id
(`owner/name`, `owner/name@REV`) and the packaged model's alias stay as given. Which is which follows
`checkpoint.resolve_local_dir`, the rule every input is opened by: the packaged alias first, then a path
that exists, anything else a hub id. The output directory is written absolute too; a rerun names a new
one with `--out` (the recorded one exists, and is never replaced without `--force`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safemerge.common.packaged import is_packaged_alias

# The model and adapter inputs of scan / merge / defend (flat config keys).
INPUT_KEYS = (
    "aligned",
    "unaligned",
    "subspace",
    "task_adapter",
    "task_model",
    "safety_adapter",
    "safety_model",
)


def recorded_input(name: str) -> str:
    """An input as a resolved config records it: a local path that exists, absolute and resolved; the
    packaged alias and anything else (a hub id, with or without `@REV`) as given."""
    if is_packaged_alias(name):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def rerunnable(
    data: Mapping[str, Any], inputs: Iterable[str] = INPUT_KEYS, out: str | None = "out"
) -> dict[str, Any]:
    """`data` (a config's flat dump) with the `inputs` it holds as `recorded_input` writes them and the
    output directory (key `out`; None: none) absolute, so that the config reruns from any working
    directory."""
    result = dict(data)
    for key in inputs:
        if isinstance(result.get(key), str):
            result[key] = recorded_input(result[key])
    if out is not None and result.get(out) is not None:
        result[out] = str(Path(str(result[out])).expanduser().resolve())
    return result


def rerun_comment(what: str, command: str, filename: str) -> str:
    """The first line of a resolved config: what it is and the command that reruns it (flags as the
    command line takes them; `--out` because the recorded output exists)."""
    return f"# resolved {what} (rerun: safemerge {command} -c {filename} --out NEW_DIR)\n"
