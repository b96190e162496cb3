"""What every config block's ``validate`` uses: the error type and the common checks."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import pathlib
import re
import traceback
from typing import Any, Iterator


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message names the field."""


def require_at_least(block: Any, where: str, minimum: int | float, *names: str, optional: bool = False) -> None:
    """Each named field of ``block`` must be >= ``minimum`` (None allowed when ``optional``);
    the error names the field by its dotted path (``where`` is the block's)."""
    for name in names:
        value = getattr(block, name)
        if value is None and optional:
            continue
        if value is None or not value >= minimum:  # NaN compares False both ways
            allowed = " (or None)" if optional else ""
            raise ConfigError(f"{where}.{name} must be >= {minimum}{allowed}, got {value}")


def check_dropout(value: float, field: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value}")


def require_finite(block: Any, where: str = "") -> None:
    """Every float field of ``block`` and of its sub-blocks is a finite number: a NaN passes
    every ``>=`` check by failing it the other way, and a NaN or Inf learning rate trains
    nothing but NaNs."""
    for f in dataclasses.fields(block):
        value, name = getattr(block, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            require_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")


@contextlib.contextmanager
def experiment_errors(path: pathlib.Path) -> Iterator[None]:
    """Turns whatever importing an experiment file or its ``get_config()`` raises into one
    ConfigError naming ``file:line`` (a syntax error, a misspelt field, any exception)."""
    try:
        yield
    except ConfigError:
        raise
    except SyntaxError as err:
        raise ConfigError(f"{err.filename or path}:{err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 - the experiment's own code: any exception is its error
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if pathlib.Path(f.filename).absolute() == path.absolute()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise ConfigError(f"{where}: {type(err).__name__}: {err}{_field_hint(err)}") from None


def _field_hint(err: Exception) -> str:
    """``; did you mean 'max_steps'?`` for a misspelt keyword of a config block."""
    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
    if not isinstance(err, TypeError) or not found:
        return ""
    import rlhf_jax.config as config

    block = getattr(config, found.group(1), None)
    if not dataclasses.is_dataclass(block):
        return ""
    close = difflib.get_close_matches(found.group(2), [f.name for f in dataclasses.fields(block)], n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; {found.group(1)} has no such field"
