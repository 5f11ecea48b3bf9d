"""Validation helpers shared by the config sections (atesd_mc.config and its config_* modules).

Every error is a ConfigError whose message names the field and the offending value, so that
atesd_mc.config_io can prefix it with the YAML file or the flag that set the value.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (and file, when known)."""


def require(cond: bool, field_name: str, value: Any, why: str) -> None:
    """Raise ConfigError naming `field_name`=`value` and `why` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"invalid config: {field_name}={value!r}: {why}")


def require_one_of(field_name: str, value: Any, choices: tuple) -> None:
    """Raise ConfigError unless `value` is one of `choices`."""
    require(value in choices, field_name, value, f"must be one of {', '.join(map(str, choices))}")
