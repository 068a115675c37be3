"""The one YAML config loader: a YAML file gives any subset of a pydantic model's fields, command-line
flags override it, and every problem is one `InputError` (exit code 2) naming the file and the key.

A config class may list `EXCLUSIVE_OPTIONS`: option names of which a flag replaces the file's choice
(e.g. `--top-k` on the command line replaces `threshold:` in the file: they are alternatives), and
`required_groups(given)`: the groups of keys of which one must be given (`task_adapter` or `task_model`),
which may depend on the keys given; every missing one, and every required field, is named in one
message before validation. Given the command
line's flags, messages name flags as typed (docs/engine.md, "The command line").
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

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


def validation_message(
    exc: ValidationError,
    cls: type[BaseModel] | None = None,
    flags: Mapping[str, str] | None = None,
) -> str:
    """pydantic's errors as one line, each naming its key: `top_k: Input should be ...; extra: ...`.

    Our own validators' messages lose pydantic's "Value error, " prefix: they are written for users, and
    a key they name in backticks (`` `task_adapter` ``) is shown as its flag when `flags` maps it (the
    command line's spelling, e.g. `--task-adapter`). An unknown key gets the closest valid key as a
    suggestion."""
    return "; ".join(_error_text(e, cls, flags or {}) for e in exc.errors())


def _error_text(e: Any, cls: type[BaseModel] | None, flags: Mapping[str, str]) -> str:
    """One pydantic error (`ValidationError.errors()` item) as a user reads it."""
    loc = tuple(e["loc"])
    flat = cls.flat_loc(loc) if cls is not None and issubclass(cls, FlatConfig) else ".".join(map(str, loc))
    if e["type"] == "extra_forbidden":
        return unknown_key_message(flat, valid_keys(cls, loc[:-1]) if cls is not None else [])
    msg = name_keys(str(e["msg"]).removeprefix("Value error, "), flags)
    if e["type"] == "value_error" and (not loc or (cls is not None and _is_group(cls, loc))):
        return msg  # a model-level check: its message names its keys
    return f"{flags.get(flat, flat) or 'config'}: {msg}"


def _is_group(cls: type[BaseModel], loc: tuple[Any, ...]) -> bool:
    return len(loc) == 1 and issubclass(cls, FlatConfig) and loc[0] in cls.groups()


def name_keys(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each backticked key that `flags` maps written as its flag (`task_adapter` →
    --task-adapter); other backticked keys are left as written."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def unknown_key_message(key: str, valid: list[str]) -> str:
    """`unknown key `treshold`; did you mean `threshold`?` (difflib's closest valid key, similarity at
    least 0.6; without a close one, the valid keys are listed)."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key `{key}`; did you mean `{close[0]}`?"
    if valid:
        return f"unknown key `{key}` (valid keys: {', '.join(valid)})"
    return f"unknown key `{key}`"


def valid_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a config accepts at `loc` (() = the top level; a FlatConfig's group keys are flat there)."""
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(str(part))
        model = _model_of(field.annotation) if field is not None else None
        if model is None:
            return []  # inside a list or dict: no fixed key set to suggest from
    if issubclass(model, FlatConfig) and not loc:
        keys = [k for k in model.model_fields if k not in model.groups()]
        return keys + [flat for g in model.groups() for flat in model.flat_keys(g).values()]
    return list(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Setup`, `Setup | None`), else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def required_keys(cls: type[BaseModel], given: set[str]) -> list[tuple[str, ...]]:
    """What a config needs when the keys `given` are, as alternatives: the class's
    `required_groups(given)` (give one key of each), then each required field in declaration order."""
    groups_of = getattr(cls, "required_groups", None)
    required: list[tuple[str, ...]] = list(groups_of(given)) if groups_of is not None else []
    groups = cls.groups() if issubclass(cls, FlatConfig) else {}
    for name, field in cls.model_fields.items():
        if name in groups:  # a FlatConfig's group: its required keys are flat keys
            names = cls.flat_keys(name)  # type: ignore[attr-defined]
            inner = groups[name].model_fields
            required += [(names.get(k, k),) for k, f in inner.items() if f.is_required()]
        elif field.is_required():
            required.append((name,))
    return required


def missing_message(
    cls: type[BaseModel], data: Mapping[str, Any], flags: Mapping[str, str], source: str | Path | None
) -> str | None:
    """All the required options that neither a flag nor the YAML file gives, in one message (None when
    none is missing): `missing required options: --out, --task-adapter or --task-model`."""
    nested = [v for v in data.values() if isinstance(v, dict)]  # a group written as a YAML mapping
    given = {k for k, v in data.items() if v is not None} | {k for g in nested for k in g if g[k] is not None}
    missing = [alts for alts in required_keys(cls, given) if not given.intersection(alts)]
    if not missing:
        return None
    named = ", ".join(" or ".join(flags.get(k, f"`{k}`") for k in alts) for alts in missing)
    plural = "s" if len(missing) > 1 else ""
    if not flags:  # a config file alone (the experiment YAML) or the Python API
        return f"missing required key{plural}{f' in {source}' if source is not None else ''}: {named}"
    where = f" (as flags or as keys in {source})" if source is not None else ""
    return f"missing required option{plural}: {named}{where}"


def load_config(
    cls: type[M],
    yaml_path: str | Path | None,
    overrides: dict[str, Any],
    flags: Mapping[str, str] | None = None,
) -> M:
    """`cls` from an optional YAML file and flag overrides (a flag set to None was not given).

    `flags` maps config keys to the command line's flags, so that errors name what the user types; every
    missing required option is named in one message, before any other check runs."""
    flags = dict(flags or {})
    data = read_yaml_mapping(yaml_path) if yaml_path is not None else {}
    from_yaml = set(data)
    given = {k: v for k, v in overrides.items() if v is not None}
    exclusive = tuple(getattr(cls, "EXCLUSIVE_OPTIONS", ()))
    if any(k in given for k in exclusive):
        for k in exclusive:
            data.pop(k, None)
    data.update(given)
    missing = missing_message(cls, data, flags, yaml_path)
    if missing is not None:
        raise InputError(missing)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = f"config {yaml_path}" if yaml_path is not None else "options"
        # a key the file gave is named as the file's key, not as the flag
        shown = {k: v for k, v in flags.items() if k not in from_yaml or k in given}
        raise InputError(f"invalid {where}: {validation_message(exc, cls, shown)}") from None


def plain_dump(cfg: BaseModel, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config as plain data (paths as strings; flat keys for a `FlatConfig`), minus `exclude`."""
    data = cfg.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in exclude}


def dump_config(cfg: BaseModel, exclude: tuple[str, ...] = ()) -> str:
    """The resolved config as YAML (field order kept), for an output directory."""
    return yaml.safe_dump(plain_dump(cfg, exclude), sort_keys=False)


class FlatConfig(BaseModel):
    """A config composed of option groups (nested pydantic models) whose YAML, CLI and dump form is flat.

    `MergeConfig.merge` is a `MergeOptions`, yet users write `weights: 0.8,0.2`, not `merge: {weights: …}`:
    flat keys are routed into the group that declares them before validation, and dumps list the groups'
    keys in place, in declaration order (so the resolved YAML reads like the input). `FLAT_NAMES` renames a
    group's field in the flat form (a defence's `merge_method` is its merge group's `method`).
    """

    model_config = ConfigDict(extra="forbid")
    FLAT_NAMES: ClassVar[dict[str, dict[str, str]]] = {}  # group -> {field in the group: flat key}

    @classmethod
    def groups(cls) -> dict[str, type[BaseModel]]:
        """The option groups: fields whose type is a pydantic model."""
        return {
            name: f.annotation
            for name, f in cls.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
        }

    @classmethod
    def flat_keys(cls, group: str) -> dict[str, str]:
        """{field in `group`: its flat key}."""
        names = cls.FLAT_NAMES.get(group, {})
        return {inner: names.get(inner, inner) for inner in cls.groups()[group].model_fields}

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for group in cls.groups():
            if isinstance(data.get(group), BaseModel):
                continue  # already built
            sub = dict(data.pop(group, None) or {})
            for inner, flat in cls.flat_keys(group).items():
                if flat in data:
                    sub[inner] = data.pop(flat)
            data[group] = sub
        return data

    @model_serializer(mode="wrap")
    def _flatten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        nested = handler(self)
        out: dict[str, Any] = {}
        for key, value in nested.items():
            if key in self.groups() and isinstance(value, dict):
                names = self.flat_keys(key)
                out.update({names.get(str(k), str(k)): v for k, v in value.items()})
            else:
                out[key] = value
        return out

    @classmethod
    def from_flat(cls, **options: Any) -> Self:
        """Build from flat keys, as a YAML file gives them: `MergeConfig.from_flat(weights=(0.8, 0.2), …)`."""
        return cls.model_validate(options)

    def flat_fields_set(self) -> set[str]:
        """The flat keys given explicitly (by YAML, flags or keyword), as `model_fields_set` for flat keys."""
        given = {k for k in self.model_fields_set if k not in self.groups()}
        for group in self.groups():
            names = self.flat_keys(group)
            given |= {names[k] for k in getattr(self, group).model_fields_set}
        return given

    @classmethod
    def flat_default(cls, key: str) -> Any:
        """The default value of a flat key."""
        for group, model in cls.groups().items():
            for inner, flat in cls.flat_keys(group).items():
                if flat == key:
                    return model.model_fields[inner].get_default(call_default_factory=True)
        return cls.model_fields[key].get_default(call_default_factory=True)

    @classmethod
    def flat_loc(cls, loc: tuple[Any, ...]) -> str:
        """An error location in flat terms: ('merge', 'method') → 'merge_method'."""
        if len(loc) >= 2 and loc[0] in cls.groups():
            return ".".join([cls.flat_keys(str(loc[0])).get(str(loc[1]), str(loc[1])), *map(str, loc[2:])])
        return ".".join(map(str, loc)) or "config"
