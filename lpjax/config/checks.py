"""Small validators for config values; each failure is one ConfigError line naming the key and the fix.

Every number must be finite: ``inf > 0`` holds, so a positivity check alone lets ``learning_rate=inf``
through, and the run's first update makes every parameter non-finite. ``finite_everywhere`` checks
the whole config once, whatever the key; the range checks below refuse non-finite values as well.

The validators share one contract. Args: ``value`` (the config's value), ``key`` (its dotted config
key, which the message names, with the ``--config.KEY=...`` that fixes it) and, where taken, ``fix``
(the fix to name instead, for values that do not come from a --config flag). Returns: the value,
as its kind (``int``, ``float``, a tuple for lists; None for a list left unset). Raises: ConfigError.
"""

import difflib
import inspect
import math
from collections.abc import Mapping, Sequence

from lpjax.errors import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to users


def positive_int(value, key: str, fix: str | None = None) -> int:
    """An integer >= 1 (not a bool)."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; "
                          f"{fix or f'set --config.{key}=N with N >= 1'}")
    return value


def non_negative_int(value, key: str) -> int:
    """An integer >= 0 (not a bool)."""
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}; set --config.{key}=N with N >= 0")
    return value


def _is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def positive_number(value, key: str, fix: str | None = None) -> float:
    """A finite number > 0, as a float."""
    if not _is_finite_number(value) or not value > 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}; "
                          f"{fix or f'set --config.{key}=X with X > 0'}")
    return float(value)


def non_negative_number(value, key: str) -> float:
    """A finite number >= 0, as a float."""
    if not _is_finite_number(value) or not value >= 0:
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}; set --config.{key}=X with X >= 0")
    return float(value)


def fraction_below_one(value, key: str) -> float:
    """A decay factor such as momentum: in [0, 1), since 1 never forgets and more grows without bound."""
    if not _is_finite_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{key} must be a number in [0, 1), got {value!r}; set --config.{key}=X with 0 <= X < 1")
    return float(value)


def finite_everywhere(tree, prefix: str = "") -> None:
    """Raises ConfigError naming the key unless every float in ``tree`` (a config as nested dicts, at
    any depth and inside lists and tuples) is finite; ``prefix`` is the dotted key of ``tree``."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            finite_everywhere(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix} must hold finite numbers, got {item!r} in {tuple(tree)}; "
                                  f"give finite values in --config.{prefix}='(a, b, ...)'")
            finite_everywhere(item, prefix)
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{prefix} must be a finite number, got {tree!r}; set --config.{prefix} to a finite value")


def builder_sizes(given: Mapping, builder, section: str) -> None:
    """Every integer a builder is given is a size or a count (width, depth, heads): >= 1, or >= 0
    where the builder's own default is 0 (an option that is off unless asked for, such as
    ``head_conv``). The items of a list or tuple are counts per part (``blocks_per_stage=(0, 1, 1,
    1)`` leaves the first stage without blocks): >= 0 each, and not all 0.

    Args:
      given: the builder keywords from the config's ``section``.
      builder: the model builder, whose signature gives the defaults.
      section: the config section, for the message (``model``).
    """
    params = inspect.signature(builder).parameters
    for key, value in given.items():
        default = params[key].default if key in params else None
        if isinstance(value, (list, tuple)):
            ints = [item for item in value if _is_int(item)]
            if any(item < 0 for item in ints) or (ints and len(ints) == len(value) and not any(ints)):
                raise ConfigError(f"{section}.{key} must hold integers >= 0, not all 0, got {tuple(value)}; "
                                  f"set --config.{section}.{key}='(a, b, ...)' with counts of at least 0")
            continue
        floor = 0 if _is_int(default) and default == 0 else 1
        if _is_int(value) and value < floor:
            raise ConfigError(f"{section}.{key} must be an integer >= {floor}, got {value!r}; "
                              f"set --config.{section}.{key} to a size of at least {floor}")


def boolean(value, key: str) -> bool:
    """True or False only (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r}; set --config.{key}=True or False")
    return value


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``choices`` (difflib), or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value, choices, key: str):
    """One of ``choices`` (the message lists them and the closest, with ``key`` naming the kind)."""
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}{did_you_mean(value, choices)}; choose one of {', '.join(choices)}")
    return value


def required(value, key: str, hint: str):
    """Anything but None or ""; ``hint`` says what to set it to."""
    if value is None or value == "":
        raise ConfigError(f"{key} is not set; {hint}")
    return value


def number_list(value, key: str) -> tuple[float, ...] | None:
    """None, or a sequence of finite numbers as a tuple of floats."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{key} must be a list of numbers, got {value!r}; write it as --config.{key}='(a, b, ...)'")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{key} must hold numbers only, got {item!r} in {tuple(value)}")
        if not _is_finite_number(item):
            raise ConfigError(f"{key} must hold finite numbers, got {item!r} in {tuple(value)}")
    return tuple(float(item) for item in value)


def loss_weights(value, key: str) -> tuple[float, ...] | None:
    """Per-stage loss weights: finite, >= 0 (a negative weight makes its stage climb its loss) and not
    all 0 (nothing would train)."""
    weights = number_list(value, key)
    if weights is None:
        return None
    for k, weight in enumerate(weights):
        if weight < 0:
            raise ConfigError(f"{key}[{k}] is {weight!r}: a negative weight makes stage {k} ascend its loss; "
                              f"give weights >= 0 (0 leaves that stage's own loss out)")
    if weights and not any(weights):
        raise ConfigError(f"{key} are all 0, so no stage would learn; give at least one positive weight")
    return weights


def int_list(value, key: str) -> tuple[int, ...] | None:
    """None, or a sequence of integers as a tuple."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}; write it as --config.{key}='(a, b, ...)'")
    return tuple(value)


def no_unknown_keys(given: Mapping, known: Mapping, *, open_sections=(), prefix: str = "") -> None:
    """Reject keys that the base config does not have: a typo in a recipe must not pass silently.

    Args:
      given: the user's config as nested dicts.
      known: the base config as nested dicts.
      open_sections: dotted keys of sections (e.g. ``model``) that take arbitrary extra keys, which
        are passed on as keyword arguments.
      prefix: the dotted key of ``given`` (for the message).

    Returns None; raises ConfigError for the first unknown key (with a "did you mean") or a value
    where a section belongs.
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
