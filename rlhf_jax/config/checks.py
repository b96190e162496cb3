"""What every config block's ``validate`` uses: the error type and the common checks."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message names the field."""


def require_at_least(block: Any, where: str, minimum: int | float, *names: str, optional: bool = False) -> None:
    """Each named field of ``block`` must be >= ``minimum`` (None allowed when ``optional``);
    the error names the field by its dotted path (``where`` is the block's)."""
    for name in names:
        value = getattr(block, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            allowed = " (or None)" if optional else ""
            raise ConfigError(f"{where}.{name} must be >= {minimum}{allowed}, got {value}")


def check_dropout(value: float, field: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value}")
