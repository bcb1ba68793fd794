"""Scratch folders that a killed process does not leave behind: local temporary folders and
the preprocessing stage's staging folders in the run directory.

A stage cleans its scratch in a ``finally`` block, which SIGKILL, the OOM killer or a
preempted node never run. So every scratch folder carries its owner: the host, the process id
and the process's start time (a process id alone is reused, by the next container of a pod
first of all, whose first process is pid 1 again). The next scratch folder made on that host
sweeps away those whose owner no longer runs. Staging folders in a shared run directory
(``gs://``) may come from another host, whose processes cannot be seen: those are removed
once they are older than :data:`FOREIGN_GRACE_SECONDS`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from typing import Any

from components.core import storage

PREFIX = "finetune-"
OWNER = "owner.json"  # inside a staging folder: who made it, and when
FOREIGN_GRACE_SECONDS = 24 * 3600
_swept = False


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` since boot (``/proc/<pid>/stat`` field 22), "" when
    it does not run, or "?" where there is no /proc (then only the pid is checked)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return ""
    except (OSError, IndexError):
        return "?"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except OSError:
        pass
    return "?"


def _me() -> str:
    return f"{os.getpid()}-{_start_time(os.getpid())}"


def _alive(owner: str) -> bool:
    """Whether ``<pid>-<start time>`` (this host's) still runs."""
    pid, _, start = owner.partition("-")
    if not pid.isdigit():
        return True  # not ours to judge
    now = _start_time(int(pid))
    return bool(now) and (now == start or "?" in (now, start))


def mkdtemp(kind: str) -> str:
    """A new local temporary folder ``finetune-<kind>-<pid>-<start>-<random>``; the caller
    removes it. The first call in a process sweeps the folders of dead processes first."""
    global _swept
    if not _swept:
        _swept = True
        sweep_local()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{_me()}-")


def sweep_local(root: str | None = None) -> list[str]:
    """Removes this user's ``finetune-*`` temporary folders whose process is gone; returns them."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        parts = name[len(PREFIX) :].split("-") if name.startswith(PREFIX) else []
        if len(parts) < 4 or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            mine = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and not _alive(f"{parts[-3]}-{parts[-2]}"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        _say(f"removed {len(removed)} temporary folder(s) left by killed runs: {', '.join(removed)}")
    return removed


def new_staging(parent: str, stage: str) -> str:
    """``<parent>/.<stage>-staging-<random>`` with its :data:`OWNER` written first, after
    removing the staging folders of that stage that killed runs left in ``parent``."""
    sweep_staging(parent, stage)
    folder = storage.join(parent, f".{stage}-staging-{uuid.uuid4().hex[:8]}")
    owner = {"host": socket.gethostname(), "process": _me(), "created": time.time()}
    storage.write_text(storage.join(folder, OWNER), json.dumps(owner) + "\n")
    return folder


def sweep_staging(parent: str, stage: str, now: float | None = None) -> list[str]:
    """Removes ``<parent>/.<stage>-staging-*`` folders whose maker is gone: a process of this
    host that no longer runs, or anything older than :data:`FOREIGN_GRACE_SECONDS`."""
    prefix = storage.join(parent, f".{stage}-staging-")
    if storage.is_gcs(parent):
        names = {
            f.uri[len(prefix) :].split("/")[0] for f in storage.list_files(parent) if f.uri.startswith(prefix)
        }
    else:
        names = {
            n[len(os.path.basename(prefix)) :]
            for n in _listdir(parent)
            if n.startswith(os.path.basename(prefix))
        }
    folders = [prefix + name for name in sorted(names)]
    now = time.time() if now is None else now
    removed = []
    for folder in folders:
        if _abandoned(storage.read_json_object(storage.join(folder, OWNER)), now):
            storage.delete_tree(folder)
            removed.append(folder)
    if removed:
        _say(f"removed {len(removed)} staging folder(s) left by killed runs: {', '.join(removed)}")
    return removed


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _abandoned(owner: dict[str, Any] | None, now: float) -> bool:
    if owner is None:
        return True  # killed before its owner record landed, which is written first
    if owner.get("host") == socket.gethostname():
        return not _alive(str(owner.get("process", "")))
    created = owner.get("created")
    return not isinstance(created, (int, float)) or now - created > FOREIGN_GRACE_SECONDS


def _say(message: str) -> None:
    print(f"[cleanup] {message}", file=sys.stderr, flush=True)
