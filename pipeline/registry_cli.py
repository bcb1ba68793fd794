"""``finetune registry ...``: look at the serving registry and move its aliases.

Every subcommand finds the registry from ``--registry URI`` or, failing that, from the
``registry.uri`` of ``--config FILE``. The bookkeeping itself lives in
:mod:`components.registry`; this module only parses, calls and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from components.core.errors import ConfigError

HELP = "list versions, show one, promote / roll back aliases, history, models.config, fsck, gc"
DESCRIPTION = """\
The serving registry at registry.uri (a local directory or gs:// prefix) in TensorFlow
Serving's layout: <uri>/<name>/<version>/saved_model.pb, so a server can watch it directly.
Aliases (production, staging, any name) point at versions and move by compare-and-swap; every
move is kept in a history that is never rewritten. A version counts once it is complete: its
commit record and its saved_model.pb. fsck finishes or quarantines what a killed push left; gc
removes dead claims and staging folders. Run both while no push is running: anything younger
than --grace-hours is left alone.

examples:
  finetune registry list --registry registry
  finetune registry show beans 3 --config configs/beans.yaml
  finetune registry promote beans 3 --alias production --reason "beats v2 on the May data"
  finetune registry rollback beans --alias production
  finetune registry history beans
  finetune registry serving-config --registry gs://bucket/registry --out models.config
  finetune registry fsck --registry registry --dry-run
  finetune registry gc beans --registry registry --grace-hours 48
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds ``registry`` and its subcommands to the ``finetune`` parser."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", metavar="URI", help="registry directory or gs:// prefix")
    where.add_argument("--config", metavar="FILE", help="take the registry from this config's registry.uri")
    where.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    where.add_argument("-v", "--verbose", action="store_true", help="show Beam and TensorFlow logs")
    parser = sub.add_parser(
        "registry", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cmds = parser.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    p = cmds.add_parser("list", parents=[where], help="models, or the versions of one model")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = cmds.add_parser("show", parents=[where], help="one version's record (default: the newest)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", nargs="?", type=int, metavar="VERSION")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmds.add_parser("promote", parents=[where], help="point an alias at a version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", type=int, metavar="VERSION")
    p.add_argument("--alias", required=True, help="e.g. production or staging")
    p.add_argument("--reason", default="", help="recorded in the history")
    p = cmds.add_parser("rollback", parents=[where], help="move an alias back to its previous version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--alias", required=True, help="e.g. production")
    p.add_argument("--reason", default="", help="recorded in the history")
    p = cmds.add_parser("history", parents=[where], help="every alias move of a model, oldest first")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--alias", help="only this alias")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = cmds.add_parser("serving-config", parents=[where], help="write TF Serving's models.config")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to include (default: all)")
    p.add_argument("--out", metavar="FILE", help="write here (local or gs://) instead of stdout")
    p.add_argument(
        "--base-path",
        default="",
        metavar="PATH",
        help="where the server sees the registry (default: its URI)",
    )
    _add_maintenance(cmds, where)


def _add_maintenance(cmds: argparse._SubParsersAction, where: argparse.ArgumentParser) -> None:
    """``fsck`` and ``gc``: the same arguments, both safe to re-run."""
    for command, text in (
        ("fsck", "complete or quarantine versions that killed pushes left unfinished"),
        ("gc", "remove dead claims, staging folders and fingerprint claims"),
    ):
        p = cmds.add_parser(command, parents=[where], help=text)
        p.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: all)")
        p.add_argument(
            "--grace-hours",
            type=float,
            default=24.0,
            metavar="H",
            help="leave alone what is younger (a push may still be running; default: 24)",
        )
        p.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")


def registry_uri(args: argparse.Namespace) -> str:
    """``--registry``, else ``registry.uri`` of ``--config``.

    Raises:
        ConfigError: neither names a registry.
    """
    if args.registry:
        return args.registry
    if args.config or args.overrides:
        from components.config import load_config

        uri = load_config(args.config, args.overrides).registry.uri
        if uri:
            return uri
    raise ConfigError("no registry: pass --registry URI, or --config FILE whose registry.uri is set")


def main(args: argparse.Namespace) -> int:
    """Runs one ``finetune registry`` subcommand; returns the exit code."""
    from components import registry

    uri = registry_uri(args)
    command = args.registry_command
    if command == "list":
        _list(registry, uri, args.name, args.json)
    elif command == "show":
        _show(registry, uri, args.name, args.version, args.json)
    elif command == "promote":
        move = registry.promote(uri, args.name, args.alias, args.version, args.reason)
        if move is None:
            print(
                f"'{args.alias}' of '{args.name}' already points at version {args.version}; nothing changed"
            )
        else:
            before = "unset" if move.previous is None else f"version {move.previous}"
            print(f"'{args.alias}' of '{args.name}': {before} -> version {move.version}")
    elif command == "rollback":
        move = registry.rollback(uri, args.name, args.alias, args.reason)
        print(f"'{args.alias}' of '{args.name}' rolled back: version {move.previous} -> {move.version}")
    elif command == "history":
        _history(registry, uri, args.name, args.alias, args.json)
    elif command == "serving-config":
        _serving_config(registry, uri, args.names, args.out, args.base_path)
    elif command in ("fsck", "gc"):
        _maintain(registry, uri, command, args.names, args.grace_hours, args.dry_run)
    return 0


def _maintain(registry: Any, uri: str, command: str, names: list[str], grace: float, dry_run: bool) -> None:
    """``fsck`` or ``gc`` of each model: one line per thing done or left alone."""
    from components import registry_maintenance

    if not 0 <= grace <= 1e6:  # also refuses nan and inf
        raise ConfigError(f"--grace-hours {grace}: must be a number of hours, 0 or more")
    run = getattr(registry_maintenance, command)
    names = [registry.check_name(n) for n in names] or registry.model_names(uri)
    changed = 0
    for name in names:
        for action in run(uri, name, grace_hours=grace, dry_run=dry_run):
            print(f"{name}: {action.line(dry_run)}")
            changed += action.apply is not None
    verb = "would change" if dry_run else "changed"
    print(f"{command}: {verb} {changed} thing(s) in {len(names)} model(s) of {uri}")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _list(registry: Any, uri: str, name: str | None, as_json: bool) -> None:
    if name is None:
        models = []
        for model in registry.model_names(uri):
            records = registry.versions(uri, model)
            aliases = registry.aliases_of(uri, model)
            models.append({"name": model, "versions": [r["version"] for r in records], "aliases": aliases})
        if as_json:
            print(json.dumps(models, indent=2))
            return
        rows = [
            [m["name"], len(m["versions"]), max(m["versions"], default=None), _aliases(m["aliases"])]
            for m in models
        ]
        print(_table(rows, ["NAME", "VERSIONS", "LATEST", "ALIASES"]) if rows else f"no models in {uri}")
        return
    records = registry.versions(uri, name)
    aliases = registry.aliases_of(uri, name)
    for r in records:
        r["complete"] = registry.is_complete(uri, name, r["version"])
    if as_json:
        print(json.dumps({"name": name, "versions": records, "aliases": aliases}, indent=2))
        return
    rows = []
    for r in records:
        v = r.get("verdict") if isinstance(r.get("verdict"), dict) else {}
        at = [a for a, n in aliases.items() if n == r["version"]]
        rows.append([r["version"], r.get("created"), v.get("metric"), _num(v.get("candidate")),
                     _num(v.get("baseline")), ",".join(sorted(at)) or None,
                     "ok" if r["complete"] else "INCOMPLETE", r.get("source_run")])  # fmt: skip
    header = ["VERSION", "CREATED", "METRIC", "CANDIDATE", "BASELINE", "ALIASES", "STATE", "SOURCE RUN"]
    print(_table(rows, header) if rows else f"'{name}' has no committed versions in {uri}")


def _num(value: Any) -> str | None:
    return f"{float(value):.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else None


def _aliases(aliases: dict[str, int]) -> str:
    return ", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "-"


def _show(registry: Any, uri: str, name: str, version: int | None, as_json: bool) -> None:
    if version is None:
        records = registry.versions(uri, name)
        if not records:
            raise ConfigError(f"'{name}' has no committed versions in {uri}")
        version = int(records[-1]["version"])
    record = registry.get_version(uri, name, version)
    record["uri"] = registry.version_uri(uri, name, version)
    record["aliases"] = sorted(a for a, v in registry.aliases_of(uri, name).items() if v == version)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    import yaml

    sys.stdout.write(yaml.safe_dump(record, sort_keys=False))


def _history(registry: Any, uri: str, name: str, alias: str | None, as_json: bool) -> None:
    moves = registry.history(uri, name) if alias is None else registry.alias_history(uri, name, alias)
    if as_json:
        print(json.dumps([m.to_dict() for m in moves], indent=2))
        return
    rows = [[m.when, m.alias, m.action, m.previous, m.version, m.who, m.reason] for m in moves]
    header = ["WHEN", "ALIAS", "ACTION", "FROM", "TO", "WHO", "REASON"]
    print(_table(rows, header) if rows else f"no alias of '{name}' has moved yet")


def _serving_config(registry: Any, uri: str, names: list[str], out: str | None, base_path: str) -> None:
    from components.core import storage
    from components.push import serving

    text = serving.models_config(uri, names or registry.model_names(uri), base_path)
    if out:
        storage.write_text(out, text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
