"""YAML files and Megatron-style --kebab-case flags for the config dataclasses (atesd_mc.config).

Every field becomes a flag named after it (field names are unique across sections, so the flag
namespace is flat, as in Megatron); YAML files hold one mapping per section, and may extend another
file with `base: other.yaml` (see load_yaml). Errors name the YAML file and key, or the flag, and the
offending value."""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any

from atesd_mc.config import SECTIONS, ConfigError, RunConfig


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """flag field name -> (section, field); asserts names are unique across sections."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a config dataclass."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_type(cls: type, f: dataclasses.Field):
    return typing.get_type_hints(cls)[f.name]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or flag value to the annotated type; errors name `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"invalid config: {where}={value!r}: expected a list")
        return [_coerce(v, inner, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid config: {where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config: {where}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"invalid config: {where}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"invalid config: {where}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"invalid config: {where}={value!r}: expected a string")
    raise TypeError(f"unsupported config type {tp} for {where}")


def _build(raw: dict[str, dict[str, Any]], name: str, source: str,
           from_flags: frozenset[str] = frozenset(), origins: dict[str, str] | None = None) -> RunConfig:
    """Sections from {section: {field: value}}; errors name the YAML file or the flag that set
    the value (from_flags: fields given on the command line; origins: field -> the YAML file that
    set it, which for a config extending another may be a base file rather than `source`)."""
    import re

    def src(field_name: str) -> str:
        return f"{origins[field_name]}: " if origins and field_name in origins else source

    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                where = f"{src(f.name)}{section}.{f.name}"
                if f.name in from_flags:
                    where = "--" + f.name.replace("_", "-")
                kwargs[f.name] = _coerce(values[f.name], _resolved_type(cls, f), where)
        try:
            sections[section] = cls(**kwargs)
        except ConfigError as e:
            named = re.match(r"invalid config: (\w+)=", str(e))
            if named and named.group(1) in from_flags:
                raise ConfigError(f"{e} (from --{named.group(1).replace('_', '-')})") from None
            raise ConfigError(f"{src(named.group(1)) if named else source}{e}") from None
    return RunConfig(name=name, **sections)


def load_yaml(path: str) -> dict[str, dict[str, Any]]:
    """Read a YAML config into {section: {field: value}}, rejecting unknown sections/keys.

    `base: other.yaml` (relative to this file; chains allowed, cycles refused) makes this file extend
    another: its sections are merged field by field over the base's. The run `name` is not inherited:
    it defaults to the stem of the file given, so an extending config never writes to its base's run."""
    return _load_chain(path, ())[0]


def _load_chain(path: str, chain: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged config, field -> the file that set it); chain: the files that extend this one."""
    key = os.path.realpath(path)
    if key in (os.path.realpath(p) for p in chain):
        raise ConfigError(f"{chain[0]}: config files extend each other in a cycle: {' -> '.join(chain + (path,))}")
    raw, base = _read_one(path)
    if base is None:
        merged, origins = {}, {}
    else:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: invalid config: base={base!r}: config file not found: {base_path}")
        merged, origins = _load_chain(base_path, chain + (path,))
        merged.pop("name", None)  # a name belongs to the file that states it
    for section, values in raw.items():
        if section == "name":
            merged["name"] = values
            continue
        merged.setdefault(section, {}).update(values)
        origins.update(dict.fromkeys(values, path))
    return merged, origins


def _read_one(path: str) -> tuple[dict[str, Any], str | None]:
    """One YAML file's own sections (validated) and its `base:` (None when it extends nothing)."""
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base):
        raise ConfigError(f"{path}: invalid config: base={base!r}: expected a YAML file name")
    out: dict[str, Any] = {}
    for section, values in raw.items():
        if section == "name":
            out["name"] = values
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for k in values:
            if k not in known:
                raise ConfigError(f"{path}: unknown key {section}.{k}")
        out[section] = dict(values)
    return out, base


class _HelpFormatter(argparse.HelpFormatter):
    """Lists a boolean's --no-X beside its --X on the one entry that carries the help text
    (the --no-X action itself is hidden, so no flag is listed twice)."""

    def _format_action_invocation(self, action) -> str:
        text = super()._format_action_invocation(action)
        negative = getattr(action, "negative_flag", None)
        return f"{text}, {negative}" if negative else text


def _add_bool(group, f: dataclasses.Field, flag: str, help_text: str) -> None:
    """--X [BOOL] (bare --X = true), plus --no-X = false. A field already named as a negation
    (no_load_optim, Megatron's --no-load-optim) gets only its own flag: no --no-no-load-optim."""
    action = group.add_argument(flag, dest=f.name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=help_text)
    if not f.name.startswith("no_"):
        action.negative_flag = "--no-" + flag[2:]
        group.add_argument(action.negative_flag, dest=f.name, action="store_const", const="false",
                           help=argparse.SUPPRESS)


def build_arg_parser() -> argparse.ArgumentParser:
    """Megatron-style parser: --config plus one --kebab-case flag per config field. The usage line
    names --config only: the option list below it is where each flag appears, once."""
    parser = argparse.ArgumentParser(description="ATESD self-distillation on megatron-core",
                                     usage="%(prog)s [-h] [--config YAML] [--FLAG VALUE ...] "
                                           "(flags override the YAML)",
                                     formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default="", metavar="YAML",
                        help="YAML config (sections as in atesd_mc.config)")
    parser.add_argument("--name", default=None, help="run name (default: the config file's stem)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
            if _resolved_type(cls, f) is bool:
                _add_bool(group, f, flag, help_text)
            else:
                group.add_argument(flag, dest=f.name, default=None, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """YAML (``--config``) then flags; flags win. Raises ConfigError with the field named."""
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown flag(s): {' '.join(unknown)}")
    raw, origins = _load_chain(args.config, ()) if args.config else ({}, {})
    name = args.name or raw.pop("name", None) or (
        os.path.splitext(os.path.basename(args.config))[0] if args.config else "tiny_arith")
    raw.pop("name", None)
    index = _field_index()
    flags = set()
    for key, value in vars(args).items():
        if key in ("config", "name") or value is None:
            continue
        section, _ = index[key]
        raw.setdefault(section, {})[key] = value
        flags.add(key)
    source = f"{args.config}: " if args.config else ""
    return _build(raw, name, source, frozenset(flags), origins)


def config_from_dict(raw: dict[str, Any], name: str = "tiny_arith") -> RunConfig:
    """Build a RunConfig from nested dicts (tests, tools)."""
    index = _field_index()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}")
        for key in values:
            if key not in index or index[key][0] != section:
                raise ConfigError(f"unknown key {section}.{key}")
    return _build(raw, name, "")
