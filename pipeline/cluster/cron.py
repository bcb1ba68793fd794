"""Cron schedules as a Kubernetes CronJob reads them, checked before anything is sent.

Kubernetes parses ``spec.schedule`` with robfig/cron's standard parser: five fields
(minute, hour, day of month, month, day of week), each a ``*`` or ``?``, a number, a range
``a-b``, any of these with a step ``/n``, or a comma-separated list of them; months and
weekdays also by their three-letter English names; or one of the macros below. The time
zone is the CronJob's ``timeZone`` (UTC here), never a ``TZ=`` prefix. Pure functions.
"""

from __future__ import annotations

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# name, lowest, highest, names of the values from the lowest on
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
SHAPE = (
    "five fields (minute hour day month weekday, e.g. '0 2 * * *' for 02:00 UTC daily) "
    "or one of " + ", ".join(MACROS)
)


def problem(schedule: str) -> str | None:
    """What is wrong with ``schedule`` (None when Kubernetes will accept it).

    >>> problem("0 2 * * *") is None
    True
    >>> problem("0 24 * * *")
    "hour '24': 24 is outside 0-23"
    """
    text = schedule.strip()
    if text.lower() in MACROS:
        return None
    if text.upper().startswith(("TZ=", "CRON_TZ=")):
        return "no TZ= prefix: the CronJob's timeZone sets the zone (UTC)"
    fields = text.split()
    if len(fields) != len(_FIELDS):
        return f"{len(fields)} field{'s' * (len(fields) != 1)}, expected {len(_FIELDS)}"
    for (name, low, high, names), field in zip(_FIELDS, fields, strict=True):
        for part in field.split(","):
            wrong = _part_problem(part, low, high, names)
            if wrong:
                return f"{name} '{field}': {wrong}"
    return None


def _part_problem(part: str, low: int, high: int, names: tuple[str, ...]) -> str | None:
    """One comma-separated element: ``*``, ``?``, ``n``, ``a-b``, each with an optional ``/step``."""
    base, slash, step = part.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return f"step '{step}' must be a whole number above 0"
    if base in ("*", "?"):
        return None
    start, dash, end = base.partition("-")
    values = [_value(v, low, names) for v in ((start, end) if dash else (start,))]
    if None in values:
        named = f" or {names[0]}-{names[-1]}" if names else ""
        return f"'{part}' is not a value {low}-{high}{named}"
    for value in values:
        if not low <= value <= high:
            return f"{value} is outside {low}-{high}"
    if dash and values[0] > values[1]:
        return f"the range '{base}' runs backwards"
    return None


def _value(text: str, low: int, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text)
    if text.upper() in names:
        return low + names.index(text.upper())
    return None


def check_message(schedule: str, flag: str) -> str | None:
    """The error line for a bad ``schedule`` given as ``flag``, or None when it is good."""
    wrong = problem(schedule)
    if wrong is None:
        return None
    return f"{flag}: '{schedule}' is not a cron schedule: {SHAPE} ({wrong})"
