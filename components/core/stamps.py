"""Provenance stamps: when an output was made and by which version of the code."""

from __future__ import annotations

import datetime
from importlib import metadata


def code_version() -> str:
    """The installed package's version, recorded in run.json and with every pushed version
    ("" when the package is not installed)."""
    try:
        return metadata.version("finetune-pipeline")
    except metadata.PackageNotFoundError:
        return ""


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2026-11-26T09:30:00Z``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
