"""Typed configs for every job: nested dataclasses -> YAML loader -> generated CLI flags.

A job's config is a tree of dataclasses (``PreprocessConfig``, ``TrainConfig``, ``EvalConfig``):
the single source of truth for names, types, defaults, choices and docs (STYLE.md 3).

* **Types**: ``build`` makes the tree from a mapping (a YAML file, flags, a checkpoint's JSON).
  An unknown key is refused by name with the known keys listed; a value of the wrong type is
  coerced where that is unambiguous (``"3"`` for an int, ``"1e-3"`` for a float, which is what
  PyYAML and argparse hand over) and refused otherwise. Fields without a default are required.
* **Choices** are ``typing.Literal[...]`` annotations, checked here for every Literal field, so
  a YAML value and a flag are refused alike, with the same message. Other checks stay in each
  dataclass's ``__post_init__``.
* **Docs** are the attribute docstrings written under each field (read with ``ast`` from the
  class source); they are the flags' help.
* **One loader**: ``load_config`` layers defaults <- YAML file <- overrides (dotted keys, None
  means unset).
* **Flags**: ``add_flags`` gives every leaf field a long flag ``--section.field`` (the YAML path),
  help = docstring + choices + default, plus the aliases declared next to the field with
  ``field(metadata=cli("--workers"))``. Booleans get ``--flag``/``--no-flag``, lists are
  repeatable flags (or a positional, ``cli(positional="INPUT")``), dicts take JSON. Every flag
  defaults to "unset", so a flag not given never overrides the YAML file. Fields marked
  ``cli(secret=True)`` (credentials) get no flag: they come from YAML or the environment.
  ``from_args`` turns the parsed flags back into a config through ``load_config``.

Why not jsonargparse (what litgpt's CLI is built on)? It does nested dataclasses, Literal
choices and, with its ``signatures`` extra, attribute docstrings. But (1) it reports a bad value
through its own parser error and exit, so a YAML value and a flag would not be refused by one
message through our ``UserError`` mapping; (2) its flags are the dotted paths only, while ours
keep short aliases that users and the cluster manifests already type (``-S``,
``--micro-batch``, ``--no-plot``, a positional ``INPUT...``); (3) it would add two pinned
dependencies (jsonargparse, docstring-parser) to the package and the cluster image. What we need
(scalars, Optional, Literal, list, tuple, dict, nested dataclasses) is the few hundred lines
below, on plain argparse, and it imports neither ray nor torch.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import itertools
import json
import textwrap
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError

T = TypeVar("T")

CONFIG_FLAG = "config"
"""Dest of ``--config FILE`` in the parsed namespace."""
_DEST = "cfg:"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class ConfigError(UserError):
    """A configuration value (YAML file or flag) is invalid; the message names the key."""


def cli(*flags: str, positional: str | None = None, secret: bool = False) -> dict[str, Any]:
    """Field metadata for the generated CLI: extra flags (``"--workers"``, ``"-S"``), a
    positional metavar for a list field (``"INPUT"``), or ``secret=True`` for no flag at all."""
    return {"cli": {"flags": tuple(flags), "positional": positional, "secret": secret}}


# ------------------------------------------------------------------------- introspection


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (and its bases), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None was allowed)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(tp))
    return tp, False


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One field of a config tree that holds a value (not a section)."""

    path: str
    """Dotted path, the YAML key and the long flag: ``run.workers``."""
    field: dataclasses.Field[Any]
    type: Any
    doc: str

    @property
    def _cli(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.field.metadata.get("cli", {})
        return meta

    @property
    def flags(self) -> tuple[str, ...]:
        """The long flag, then the declared aliases."""
        return (f"--{self.path}", *self._cli.get("flags", ()))

    @property
    def positional(self) -> str | None:
        return self._cli.get("positional")

    @property
    def secret(self) -> bool:
        return bool(self._cli.get("secret"))

    @property
    def required(self) -> bool:
        return (
            self.field.default is dataclasses.MISSING
            and self.field.default_factory is dataclasses.MISSING
        )

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None if self.required else self.field.default

    @property
    def choices(self) -> tuple[Any, ...] | None:
        tp, _ = _strip_optional(self.type)
        return get_args(tp) if get_origin(tp) is Literal else None


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every leaf field of a config tree, depth first in declaration order."""
    out: list[Leaf] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        if _is_config(tp):
            out += leaves(tp, f"{path}.")
        else:
            out.append(Leaf(path, f, tp, docs.get(f.name, "")))
    return out


def sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted path, dataclass) of every section below ``cls``."""
    out: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_config(tp):
            out.append((f"{prefix}{f.name}", tp))
            out += sections(tp, f"{prefix}{f.name}.")
    return out


# ------------------------------------------------------------------------- building


def build(cls: type[T], data: Any, *, where: str = "", error: type[ConfigError] = ConfigError) -> T:
    """A config tree from a (nested) mapping; unknown keys and bad values raise ``error``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise error(f"{where or 'the config'} must be a mapping, got {data!r}")
    hints = _hints(cast(type, cls))
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise error(
            f"unknown config key(s) {unknown} in {where or 'the config'}; known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], path, error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = f.metadata.get("cli", {}).get("flags", ())
            raise error(f"{path} is required (give {(flag or (f'--{path}',))[0]})")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, path: str, error: type[ConfigError] = ConfigError) -> Any:
    """``value`` as type ``tp``, or ``error`` naming ``path``."""
    if tp is Any:
        return value
    if _is_config(tp):
        if isinstance(value, str):  # a flag's value (one item of a list of sections): JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise error(f"{path} must be a JSON object, got {value!r} ({exc})") from exc
        return value if isinstance(value, tp) else build(tp, value, where=path, error=error)
    base, optional = _strip_optional(tp)
    if optional:
        if value is None or (
            isinstance(value, str) and value.lower() in _NONE_WORDS and base is not str
        ):
            return None
        return coerce(base, value, path, error)
    origin = get_origin(tp)
    if origin is Literal:
        return _choice(get_args(tp), value, path, error)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (*_TRUE_WORDS, *_FALSE_WORDS):
            return value.lower() in _TRUE_WORDS
        raise error(f"{path} must be true or false, got {value!r}")
    if tp is int:
        return _int(value, path, error)
    if tp is float:
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise error(f"{path} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise error(f"{path} must be a string, got {value!r}")
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce(item, v, f"{path}[{i}]", error) for i, v in enumerate(items)]
    if origin is tuple:
        args = get_args(tp)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise error(f"{path} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(items)
        if len(items) != len(args):
            raise error(f"{path} needs {len(args)} values, got {value!r}")
        pairs = enumerate(zip(args, items, strict=True))
        return tuple(coerce(a, v, f"{path}[{i}]", error) for i, (a, v) in pairs)
    if origin is dict:
        key_t, val_t = get_args(tp) or (Any, Any)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise error(f"{path} must be a JSON object, got {value!r} ({exc})") from None
        if not isinstance(value, Mapping):
            raise error(f"{path} must be a mapping, got {value!r}")
        return {
            coerce(key_t, k, path, error): coerce(val_t, v, f"{path}.{k}", error)
            for k, v in value.items()
        }
    raise TypeError(f"{path}: configs cannot hold a {tp!r} field")


def _int(value: Any, path: str, error: type[ConfigError]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                as_float = float(value)  # "1e3": PyYAML reads exponents without a dot as text
            except ValueError:
                as_float = 0.5
            if as_float.is_integer():
                return int(as_float)
    raise error(f"{path} must be an integer, got {value!r}")


def _choice(choices: tuple[Any, ...], value: Any, path: str, error: type[ConfigError]) -> Any:
    for c in choices:
        if value == c and type(value) is type(c):
            return c
    if isinstance(value, str):  # a flag's text for a non-string choice: "2" for zero_stage 2
        for c in choices:
            if not isinstance(c, str) and str(c) == value:
                return c
    texts = any(isinstance(c, str) for c in choices)
    got = repr(value) if texts or not isinstance(value, str) else value
    raise error(f"{path} must be one of {', '.join(map(str, choices))}, got {got}")


# ------------------------------------------------------------------------- loading


def read_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML config file's mapping (an empty file is an empty mapping)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{path}: the config file must be a YAML mapping (sections and keys)")
    return loaded


def layer(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` with dotted-key overrides applied (``packing.seed``); None values are unset."""
    out = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    error: type[ConfigError] = ConfigError,
) -> T:
    """Defaults <- YAML file <- overrides (dotted keys such as ``optim.lr``; None = unset)."""
    data = read_yaml(path, error) if path is not None else {}
    return build(cls, layer(data, overrides), error=error)


# ------------------------------------------------------------------------- flags


def _dest(path: str) -> str:
    return f"{_DEST}{path}"


def show_value(value: Any) -> str:
    """A value as the help text shows it (``none``, ``true``, ``""``, JSON for containers)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list | tuple | dict):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def flag_help(leaf: Leaf) -> str:
    """The help line of a leaf's flag: docstring, choices, default."""
    parts = [leaf.doc.rstrip(".") + "." if leaf.doc else ""]
    if leaf.choices is not None:
        parts.append(f"One of: {', '.join(map(str, leaf.choices))}.")
    if get_origin(_strip_optional(leaf.type)[0]) is list:
        parts.append("Repeatable.")
    parts.append("(required)" if leaf.required else f"(default: {show_value(leaf.default)})")
    return " ".join(p for p in parts if p).replace("%", "%%")


def _metavar(tp: Any, name: str) -> str:
    base, _ = _strip_optional(tp)
    if get_origin(base) is Literal:
        return "{" + ",".join(map(str, get_args(base))) + "}"
    if get_origin(base) is dict:
        return "JSON"
    if get_origin(base) in (list, tuple):
        (base,) = get_args(base)[:1] or (str,)
        if _is_config(base):
            return "JSON"
    return {int: "N", float: "X"}.get(base, name.upper())


def add_flags(parser: argparse.ArgumentParser, cls: type, *, config_file: bool = True) -> None:
    """Add ``--config FILE`` and one flag per leaf field of ``cls`` (grouped by section)."""
    if config_file:
        parser.add_argument(
            f"--{CONFIG_FLAG}",
            metavar="FILE",
            help="YAML file setting any field below, sections as mappings "
            "(`section: {field: value}` is --section.field VALUE); flags given override it",
        )
    docs = {path: (sec.__doc__ or "").strip().split("\n")[0] for path, sec in sections(cls)}
    for path in docs:
        hidden = [x.path for x in leaves(cls) if x.secret and x.path.rpartition(".")[0] == path]
        if hidden:
            docs[path] += (
                f" {', '.join(hidden)}: secrets, never flags; set them in the --config file "
                "or the environment."
            )
    groups: dict[str, Any] = {}
    for leaf in leaves(cls):
        if leaf.secret:
            continue
        section = leaf.path.rpartition(".")[0]
        if section and section not in groups:
            groups[section] = parser.add_argument_group(f"{section}", docs.get(section) or None)
        group = groups.get(section, parser)
        base, _ = _strip_optional(leaf.type)
        name = leaf.path.rpartition(".")[2]
        kw: dict[str, Any] = {"dest": _dest(leaf.path), "default": None, "help": flag_help(leaf)}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = _metavar(leaf.type, name)
            if get_origin(base) is list:
                kw["action"] = "append"
            elif get_origin(base) is tuple:
                args = get_args(base)
                kw["nargs"] = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        if leaf.positional:
            group.add_argument(
                _dest(leaf.path) + ":pos",
                nargs="*",
                metavar=leaf.positional,
                help=f"{leaf.doc} (or {leaf.flags[0]}; default: {show_value(leaf.default)})",
            )
        group.add_argument(*leaf.flags, **kw)


def flag_overrides(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The leaf values given as flags, by dotted path (flags not given are absent)."""
    out: dict[str, Any] = {}
    for leaf in leaves(cls):
        value = getattr(args, _dest(leaf.path), None)
        if leaf.positional:
            value = [*(getattr(args, _dest(leaf.path) + ":pos", None) or []), *(value or [])]
            value = value or None
        if value is not None:
            out[leaf.path] = value
    return out


def from_args(
    cls: type[T], args: argparse.Namespace, *, error: type[ConfigError] = ConfigError
) -> T:
    """The config the parsed flags describe: defaults <- ``--config`` file <- flags given."""
    return load_config(
        cls, getattr(args, CONFIG_FLAG, None), flag_overrides(cls, args), error=error
    )


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The Literal choices of field ``name`` of ``cls`` (for hand-written parsers)."""
    tp, _ = _strip_optional(_hints(cls)[name])
    return get_args(tp)
