"""The one YAML config loader: a YAML file gives any subset of a pydantic model's fields, command-line
flags override it, and every problem is one `InputError` (exit code 2) naming the file and the key.

A config class may list `EXCLUSIVE_OPTIONS`: option names of which a flag replaces the file's choice
(e.g. `--top-k` on the command line replaces `threshold:` in the file: they are alternatives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from safemerge.common.errors import InputError

M = TypeVar("M", bound=BaseModel)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, keys with `-` spelled `_` (so `top-k:` and `top_k:` both work)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line, each naming its key: `top_k: Input should be ...; extra: ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())


def load_config(cls: type[M], yaml_path: str | Path | None, overrides: dict[str, Any]) -> M:
    """`cls` from an optional YAML file and flag overrides (a flag set to None was not given)."""
    data = read_yaml_mapping(yaml_path) if yaml_path is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    exclusive = tuple(getattr(cls, "EXCLUSIVE_OPTIONS", ()))
    if any(k in given for k in exclusive):
        for k in exclusive:
            data.pop(k, None)
    data.update(given)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = f"config {yaml_path}" if yaml_path is not None else "options"
        raise InputError(f"invalid {where}: {validation_message(exc)}") from None


def dump_config(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """The resolved config as YAML (paths as strings, field order kept), for an output directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)
