"""Small validators for config values; each failure is one ConfigError line naming the key and the fix."""

import difflib
from collections.abc import Mapping, Sequence

from .errors import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to users


def positive_int(value, key: str, fix: str | None = None) -> int:
    """``fix``: how to put it right, when the value does not come from a --config flag."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; "
                          f"{fix or f'set --config.{key}=N with N >= 1'}")
    return value


def non_negative_int(value, key: str) -> int:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}; set --config.{key}=N with N >= 0")
    return value


def positive_number(value, key: str, fix: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}; "
                          f"{fix or f'set --config.{key}=X with X > 0'}")
    return float(value)


def non_negative_number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{key} must be a number >= 0, got {value!r}; set --config.{key}=X with X >= 0")
    return float(value)


def boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r}; set --config.{key}=True or False")
    return value


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``choices`` (difflib), or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value, choices, key: str):
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}{did_you_mean(value, choices)}; choose one of {', '.join(choices)}")
    return value


def required(value, key: str, hint: str):
    if value is None or value == "":
        raise ConfigError(f"{key} is not set; {hint}")
    return value


def number_list(value, key: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{key} must be a list of numbers, got {value!r}; write it as --config.{key}='(a, b, ...)'")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{key} must hold numbers only, got {item!r} in {tuple(value)}")
    return tuple(float(item) for item in value)


def int_list(value, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}; write it as --config.{key}='(a, b, ...)'")
    return tuple(value)


def no_unknown_keys(given: Mapping, known: Mapping, *, open_sections=(), prefix: str = "") -> None:
    """Reject keys that the base config does not have: a typo in a recipe must not pass silently.

    ``open_sections`` (e.g. ``model``) take arbitrary extra keys, which are passed on as keyword arguments.
    """
    for key, value in given.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}{did_you_mean(key, known)}; known keys here: "
                              f"{', '.join(sorted(known))}")
        if path in open_sections:
            continue
        if isinstance(known[key], Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be a section with keys {', '.join(sorted(known[key]))}")
            no_unknown_keys(value, known[key], open_sections=open_sections, prefix=f"{path}.")
