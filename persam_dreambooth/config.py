"""Plain-dataclass configuration: load from YAML/TOML, override from flags, validate, dump.

One mechanism serves every schema in the package (each layer owns its dataclass, e.g.
``persam_dreambooth.training.config.TrainConfig``):

* :func:`from_dict` builds a dataclass from a mapping. **Unknown keys are errors** that list the valid keys and the
  closest match; **type mismatches are errors** naming the key, the value and the expected type.
* :func:`load_config_file` reads ``.yaml``/``.yml`` (``yaml.safe_load``) or ``.toml`` (stdlib ``tomllib``).
* :func:`add_dataclass_arguments` turns the fields into flags: ``--field_name`` (the field name is the flag name, so
  the config key, the flag and the function parameter agree; diffusers' spelling, used by ``train``), or
  ``--field-name`` with ``dashes=True`` (the other commands), or the field's own ``flag=`` metadata
  (:func:`field_help`). :func:`flag_name` gives the spelling back, so library errors can name the flag the user
  typed. :func:`parse_config` merges ``defaults < --config FILE < flags``.
* Floats must be finite: ``nan`` and ``inf`` are refused wherever a config is filled (flags, files, code).
* :func:`to_dict` / :func:`dump_config` write the resolved config next to the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from persam_dreambooth.utils.io import atomic_write_text

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "load_config_file",
    "dump_config",
    "add_dataclass_arguments",
    "parse_config",
    "field_help",
    "flag_name",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the key, the value and the rule."""


def field_help(
    default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None,  # noqa: A002
    aliases: Sequence[str] = (), **kwargs: Any,
) -> Any:
    """``dataclasses.field`` with a ``help`` string (peft style) and optionally the flag's spelling in its metadata.

    ``flag`` (e.g. ``"--ref-box"``) overrides the spelling :func:`add_dataclass_arguments` derives from the name;
    ``aliases`` are further spellings the parser accepts (e.g. ``("--sam-model-type",)``).
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["help"] = help
    for spelling in (flag, *aliases):
        if spelling is not None and not spelling.startswith("--"):
            raise ValueError(f"flag {spelling!r} must start with '--'")
    if flag is not None:
        metadata["flag"] = flag
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _bool_hint(value: Any, tp: Any) -> str:
    """A hint when YAML turned an unquoted no/yes/off/on into a bool where a string option was expected."""
    if not isinstance(value, bool):
        return ""
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if any(get_origin(a) is Literal and any(isinstance(x, str) for x in get_args(a)) for a in args):
        return " (YAML reads unquoted no/yes/off/on as booleans: quote the value, e.g. 'no')"
    return ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (lists for list/tuple fields, floats for ints)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        finite = [e for e in errors if "finite" in e]
        if finite:  # a number that is not finite: say so, as a plain float field does
            raise ConfigError(finite[0])
        raise ConfigError(f"`{key}` must be {_type_name(tp)}, got {value!r}{_bool_hint(value, tp)}.")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"`{key}` must be null, got {value!r}.")
    if origin is Literal:
        if value in get_args(tp) and not (isinstance(value, bool) and not any(a is value for a in get_args(tp))):
            return value
        raise ConfigError(
            f"`{key}` must be one of {', '.join(repr(a) for a in get_args(tp))}; got {value!r}{_bool_hint(value, tp)}."
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` must be a mapping of {tp.__name__} fields, got {value!r}.")
        return from_dict(tp, value, where=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"`{key}` must be a list ({_type_name(tp)}), got {value!r}.")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"`{key}` must have {len(args)} items ({_type_name(tp)}), got {value!r}.")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}.")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        if not math.isfinite(number):
            raise ConfigError(f"`{key}` must be a finite number, got {value!r}.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"`{key}` must be a string, got {value!r}.")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"`{key}` must be {_type_name(tp)}, got {value!r}.")
    return value


def _unknown_key_error(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    prefix = f"{where}." if where else ""
    return ConfigError(
        f"Unknown config key `{prefix}{key}` for {cls.__name__}.{hint} Valid keys: {', '.join(sorted(names))}."
    )


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``: unknown keys and wrong types raise :class:`ConfigError`.

    Missing keys take the dataclass defaults; ``__post_init__`` then validates relations between fields.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config{' `' + where + '`' if where else ''} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(cls, str(key), where)
        full = f"{where}.{key}" if where else str(key)
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists, paths become strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return v

    return plain(cfg)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--config` file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"`--config` file {str(path)!r} is not valid YAML: {exc}") from exc
    elif suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"`--config` file {str(path)!r} is not valid TOML: {exc}") from exc
    else:
        raise ConfigError(f"`--config` must be a .yaml, .yml or .toml file, got {str(path)!r}.")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"`--config` file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}.")
    return data


def dump_config(cfg: Any, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``cfg`` (plus ``extra`` entries, e.g. the package version, under ``_meta``) as YAML, atomically."""
    data = to_dict(cfg)
    if extra:
        data = {**data, "_meta": dict(extra)}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _flag_parser(tp: Any, key: str) -> Any:
    """An argparse ``type=`` callable for the annotation ``tp``; errors name ``key`` (the flag as typed).

    The text is taken as is when the field accepts that string (a ``str`` field, a string option of a ``Literal``
    such as ``--mixed_precision no``, a number for a float field); otherwise it is read as a YAML scalar, so ints,
    lists and ``null`` come out typed.
    """

    def parse(text: str) -> Any:
        if text.strip() in ("null", "Null", "NULL", "~") and _accepts_none(tp):  # YAML's null spellings
            return None
        try:
            return _coerce(text, tp, key)
        except ConfigError:
            pass
        try:
            value = yaml.safe_load(text) if text.strip() != "" else text
        except yaml.YAMLError:
            value = text
        try:
            return _coerce(value, tp, key)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = _type_name(tp)
    return parse


def _accepts_none(tp: Any) -> bool:
    return tp is type(None) or (
        get_origin(tp) in (Union, types.UnionType) and any(a is type(None) for a in get_args(tp))
    )


def _is_bool(tp: Any) -> bool:
    if tp is bool:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args == [bool]
    return False


def _is_list(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _is_list(args[0])
        return False, None
    if origin in (list, tuple) and get_args(tp) and (origin is list or get_args(tp)[-1] is Ellipsis):
        return True, get_args(tp)[0]
    return False, None


def flag_name(cls: type, name: str, dashes: bool = False) -> str:
    """The command-line spelling of field ``name`` of ``cls``: its ``flag`` metadata, else ``--name`` (or
    ``--na-me`` with ``dashes``). Library code uses it to name the flag in an error message."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag") or ("--" + (name.replace("_", "-") if dashes else name))
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), dashes: bool = False,
    underscore_aliases: bool = False,
) -> None:
    """Add one flag per field of ``cls`` (defaults stay ``None`` so only given flags override).

    The flag is :func:`flag_name` (``--field_name``, or ``--field-name`` with ``dashes``); the value lands in
    ``args.<field_name>`` either way. Booleans get ``--flag`` / ``--no-flag``; list fields take several values
    (``--prompt a b``). The field's ``aliases`` metadata adds spellings; ``underscore_aliases`` also accepts
    ``--field_name`` next to a dashed flag (for commands that always took both).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        flag = flag_name(cls, f.name, dashes)
        spellings = [flag, *f.metadata.get("aliases", ())]
        if underscore_aliases and f"--{f.name}" not in spellings:
            spellings.append(f"--{f.name}")
        if _is_bool(tp):
            parser.add_argument(*spellings, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        is_list, item_tp = _is_list(tp)
        if is_list:
            parser.add_argument(*spellings, dest=f.name, nargs="*", type=_flag_parser(item_tp, flag), default=None,
                                help=help_text)
            continue
        choices = get_args(tp) if get_origin(tp) is Literal else None
        parser.add_argument(
            *spellings,
            dest=f.name,
            type=_flag_parser(tp, flag),
            default=None,
            help=help_text + (f" choices: {', '.join(map(str, choices))}" if choices else ""),
            metavar=f.name.upper(),
        )


def parse_config(
    cls: type[T],
    args: argparse.Namespace,
    config_path: str | os.PathLike[str] | None = None,
    skip: Sequence[str] = (),
) -> T:
    """Merge dataclass defaults < the ``--config`` file < flags given on the command line, then validate."""
    data: dict[str, Any] = load_config_file(config_path) if config_path else {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for name in names:
        if name in skip:
            continue
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return from_dict(cls, data)
