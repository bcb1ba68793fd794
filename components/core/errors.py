"""Errors users see, and the one helper that suggests what they meant."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """Base class of errors that the command line prints without a traceback."""


class ConfigError(FinetuneError, ValueError):
    """The configuration is invalid; raised before any work starts."""


class StageError(FinetuneError, RuntimeError):
    """A stage ran but its outcome must not be used (for example, too much bad input)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Returns ``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
