"""The one YAML config loader: a YAML file gives any subset of a pydantic model's fields, command-line
flags override it, and every problem is one `InputError` (exit code 2) naming the file and the key.

A config class may list `EXCLUSIVE_OPTIONS`: option names of which a flag replaces the file's choice
(e.g. `--top-k` on the command line replaces `threshold:` in the file: they are alternatives).
"""

from __future__ import annotations

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


def validation_message(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """pydantic's errors as one line, each naming its key: `top_k: Input should be ...; extra: ...`.
    Our own validators' messages lose pydantic's "Value error, " prefix: they are written for users."""
    flat = cls.flat_loc if cls is not None and issubclass(cls, FlatConfig) else None
    return "; ".join(
        f"{flat(e['loc']) if flat else '.'.join(map(str, e['loc'])) or 'config'}: "
        + e["msg"].removeprefix("Value error, ")
        for e in exc.errors()
    )


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
        raise InputError(f"invalid {where}: {validation_message(exc, cls)}") from None


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
