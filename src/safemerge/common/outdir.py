"""Output directories: never write into or over an input, never delete what safemerge did not write.

Every command writes its output directory through this module (docs/engine.md, "Outputs and `--force`"):

- `atomic_output_dir`: the output is written into a temporary sibling that is renamed into place only
  when complete; an existing directory is replaced only with `force`, and only when it is empty or holds
  nothing but a previous safemerge output (the entries its marker lists).
- `claim_output_dir`: for the commands that write into their directory over time and resume from it
  (`experiment`, the organism demo): an existing directory is reused only when it is empty or safemerge's.
- The marker `.safemerge-output` (a small JSON file naming the command and, for an atomic output, the
  entries written) is written into every output directory; it is how safemerge recognises its own output.
- An output directory equal to, inside, or containing an input (compared as resolved real paths) is
  refused, with or without `force`.
- Directories and files get the mode of the umask (a temporary directory would otherwise stay 0700,
  safetensors files 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from safemerge.common.errors import InputError

MARKER = ".safemerge-output"
LEGACY_MARKERS = (".safemerge-demo",)  # the organism demo's marker before MARKER existed
InputPath = str | Path | None
Inputs = Mapping[str, InputPath | Sequence[InputPath]]


# --- inputs ------------------------------------------------------------------------------------------
def _local_inputs(inputs: Inputs | None) -> Iterator[tuple[str, Path]]:
    """(label, path) of every input that exists on this machine; hub ids and unset inputs are skipped."""
    for label, value in (inputs or {}).items():
        values: Iterable[InputPath] = [value] if value is None or isinstance(value, str | Path) else value
        for v in values:
            if v is not None and str(v) and Path(v).expanduser().exists():
                yield label, Path(v).expanduser()


def check_not_an_input(out: str | Path, inputs: Inputs | None) -> None:
    """Refuse an output directory that is, is inside, or contains an input (symbolic links resolved):
    writing it would replace or mix with the input."""
    real_out = Path(out).expanduser().resolve()
    for label, path in _local_inputs(inputs):
        real = path.resolve()
        if real == real_out:
            how = "is"
        elif real in real_out.parents:
            how = "is inside"
        elif real_out in real.parents:
            how = "contains"
        else:
            continue
        raise InputError(
            f"output directory {out} {how} the {label} {path}; an output never overlaps an input: "
            "choose another --out"
        )


# --- what safemerge wrote ----------------------------------------------------------------------------
def _claimed(folder: Path) -> set[str] | None:
    """The entries of `folder` that safemerge's marker claims: all of them (None) for a directory written
    over time or a legacy marker, the listed ones for an atomic output, none (empty) without a marker."""
    if any((folder / m).is_file() for m in LEGACY_MARKERS):
        return None
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()  # no marker, or one safemerge cannot read: nothing is known to be safemerge's
    if not isinstance(data, dict) or data.get("written_by") != "safemerge":
        return set()
    entries = data.get("entries")
    if entries is None:
        return None
    return {MARKER, *(str(e) for e in entries)} if isinstance(entries, list) else set()


def foreign_entry(folder: Path) -> str | None:
    """The first entry (sorted) of an existing directory that safemerge did not write; None when every
    entry is safemerge's (an empty directory included)."""
    names = sorted(os.listdir(folder))
    claimed = _claimed(folder)
    if claimed is None:
        return None
    return next((n for n in names if n not in claimed), None)


def _check_existing(out: Path) -> str | None:
    """For an existing `out`: refuse what is not a plain directory; return its first foreign entry."""
    if out.is_symlink():
        raise InputError(f"output path {out} is a symbolic link; choose another --out")
    if not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory; choose another --out")
    return foreign_entry(out)


def check_output_dir(out: str | Path, force: bool, inputs: Inputs | None = None) -> None:
    """Fail early (before any work): `out` overlapping an input, an existing `out` without `force`, and
    with `force` one holding anything safemerge did not write."""
    out = Path(out)
    check_not_an_input(out, inputs)
    if not os.path.lexists(out):
        return
    foreign = _check_existing(out)
    if foreign is not None:
        if not force:
            raise InputError(
                f"output directory {out} already exists and holds {foreign}, which safemerge did not "
                "write; remove it yourself or choose another --out (--force replaces only an empty "
                "directory or an earlier safemerge output)"
            )
        raise InputError(
            f"refusing to replace {out}: it holds {foreign}, which safemerge did not write; remove it "
            "yourself or choose another --out"
        )
    if not force:
        raise InputError(f"output directory {out} already exists; pass --force to replace it")


# --- writing -----------------------------------------------------------------------------------------
def umask_mode() -> int:
    """The mode a new directory gets from the process's umask (0o777 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def apply_umask(folder: Path) -> None:
    """Give every file and directory under `folder` the mode a plain write would give it under the
    umask (0o666 & ~umask for files, 0o777 & ~umask for directories): some writers (safetensors'
    `save_file`, `tempfile`) create theirs 0600 / 0700, which would hide a shared output from its group."""
    dir_mode = umask_mode()
    file_mode = dir_mode & 0o666
    folder.chmod(dir_mode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode, follow_symlinks=False)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def write_marker(folder: Path, command: str, entries: Sequence[str] | None) -> None:
    """Mark `folder` as safemerge's: the command, and the entries it wrote (None: all of them, for a
    directory written over time). Deterministic bytes, so outputs stay byte-identical across runs."""
    listed = None if entries is None else sorted(e for e in entries if e != MARKER)
    data = {"written_by": "safemerge", "command": command, "entries": listed}
    (folder / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, force: bool = False, inputs: Inputs | None = None, command: str = "safemerge"
) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it is marked and replaces `out`, on error
    it is removed.

    The checks of `check_output_dir` run first, and again just before an existing `out` is replaced (a
    file may have appeared in it meanwhile); the old directory is removed only after the new one is in
    place.
    """
    out = Path(out)
    check_output_dir(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(umask_mode())
        yield tmp
        write_marker(tmp, command, os.listdir(tmp))
        apply_umask(tmp)
        check_output_dir(out, force, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_incremental_dir(out: str | Path, inputs: Inputs | None = None) -> None:
    """Fail early for a directory written over time: `out` overlapping an input, or an existing `out`
    holding anything safemerge did not write (it is reused, never emptied)."""
    out = Path(out)
    check_not_an_input(out, inputs)
    if os.path.lexists(out) and (foreign := _check_existing(out)) is not None:
        raise InputError(
            f"refusing to write into {out}: it holds {foreign}, which safemerge did not write; remove it "
            "yourself or choose another --out"
        )


def claim_output_dir(out: str | Path, command: str, inputs: Inputs | None = None) -> None:
    """Check `out` as `check_incremental_dir` does, create it (with the umask's mode) and mark all of it
    as safemerge's, so that later runs resume in it."""
    out = Path(out)
    check_incremental_dir(out, inputs)
    out.mkdir(parents=True, exist_ok=True)
    if not ((out / MARKER).is_file() and _claimed(out) is None):  # resumed: the marker stays as it is
        write_marker(out, command, None)
