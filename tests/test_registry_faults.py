"""Registry faults reproduced for real, on a local directory and on fake-gcs-server: versions
whose folder is gone, names that are not one path segment, corrupt records, folders that a
killed push of an older finetune left loadable, and the clean-up of dead claims and staging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from components import registry
from components.core import storage
from components.core.errors import ConfigError, StageError
from components.push import serving
from pipeline import cli
from tests.registry_helpers import (  # noqa: F401 - fixtures
    fake_gcs_prefix,
    fake_gcs_server,
    loadable_but_uncommitted,
    loadable_versions,
    reg,
)

NAME = "beans"
OLD = "2000-01-01T00:00:00Z"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(reg: str, name: str = NAME) -> int:
    """A complete version whose SavedModel is a stand-in file (bookkeeping only)."""
    number = registry.claim_version(reg, name, {"who": "test", "claimed": OLD})
    storage.write_bytes(storage.join(registry.version_uri(reg, name, number), "saved_model.pb"), b"graph")
    registry.commit_version(reg, name, number, {"fingerprint": f"fp-{number}"})
    return number


def _delete_folder(reg: str, version: int) -> None:
    for info in storage.list_files(registry.version_uri(reg, NAME, version)):
        storage.delete_file(info.uri)


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_promote_and_rollback_refuse_a_version_whose_folder_is_gone(
    reg: str, capsys: pytest.CaptureFixture
) -> None:
    v1, v2, v3 = _version(reg), _version(reg), _version(reg)
    registry.promote(reg, NAME, "production", v1)
    registry.promote(reg, NAME, "production", v2)
    _delete_folder(reg, v1)
    with pytest.raises(StageError, match="roll 'production' back to version 1.*no saved_model.pb"):
        registry.rollback(reg, NAME, "production")
    code, _, err = _cli(capsys, "registry", "rollback", NAME, "--alias", "production", "--registry", reg)
    assert code == 1 and "version 1 of 'beans' is not complete" in err and "registry fsck" in err
    _delete_folder(reg, v3)
    code, _, err = _cli(capsys, "registry", "promote", NAME, "3", "--alias", "production", "--registry", reg)
    assert code == 1 and "version 3 of 'beans' is not complete" in err
    assert registry.resolve_alias(reg, NAME, "production") == v2  # unchanged
    assert len(registry.alias_history(reg, NAME, "production")) == 2

    # serving-config: the newest (3) is skipped with a warning; an alias on a gone version is an error.
    code, out, err = _cli(capsys, "registry", "serving-config", "--registry", reg)
    assert code == 0 and "version 3 of 'beans' is not served" in err and "versions: 2" in out
    assert "versions: 3" not in out
    _delete_folder(reg, v2)
    code, out, err = _cli(capsys, "registry", "serving-config", "--registry", reg)
    assert code == 1 and "serve alias 'production'" in err and "version 2" in err and out == ""
    with pytest.raises(StageError, match="use alias 'production'"):
        registry.resolve_alias(reg, NAME, "production")
    code, out, _ = _cli(capsys, "registry", "list", NAME, "--registry", reg)
    assert code == 0 and out.count("INCOMPLETE") == 3


BAD_NAMES = ["../outside", "a/b", "", ".", "..", "/abs", "Beans", "beans\n", "x-", "b" * 64]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_name_that_is_not_one_path_segment_is_refused_everywhere(
    bad: str, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    reg = str(tmp_path / "registry")
    _version(reg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    where = ["--registry", reg]
    commands = [
        ["list", bad], ["show", bad, "1"], ["promote", bad, "1", "--alias", "production"],
        ["rollback", bad, "--alias", "production"], ["history", bad], ["serving-config", bad],
        ["fsck", bad], ["gc", bad],
    ]  # fmt: skip
    for argv in commands:
        code, _, err = _cli(capsys, "registry", *argv, *where)
        assert code == 2 and "model name" in err, (argv, err)
    for call in (
        lambda: registry.claim_version(reg, bad, {}),
        lambda: registry.commit_version(reg, bad, 1, {}),
        lambda: registry.versions(reg, bad),
        lambda: registry.promote(reg, bad, "production", 1),
    ):
        with pytest.raises(ConfigError, match="model name"):
            call()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created


@pytest.mark.parametrize("bad", ["../outside", "a/b", "", ".", "Production", "prod\n", "1st"])
def test_an_alias_that_is_not_one_path_segment_is_refused(bad: str, tmp_path, capsys) -> None:
    reg = str(tmp_path / "registry")
    _version(reg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv in (["promote", NAME, "1", "--alias", bad], ["rollback", NAME, "--alias", bad]):
        code, _, err = _cli(capsys, "registry", *argv, "--registry", reg)
        assert code == 2 and "alias" in err
    code, _, err = _cli(capsys, "registry", "history", NAME, "--alias", bad, "--registry", reg)
    assert code == 2 and "alias" in err
    with pytest.raises(ConfigError):
        registry.alias_history(reg, NAME, bad)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(ConfigError, match="version 0"):
        registry.version_uri(reg, NAME, 0)


CORRUPT = {
    "versions/2.json": "{not json",
    "versions/3.json": '["a list"]',
    "versions/4.json": '{"version": "4"}',
    "versions/5.json": '{"version": 6}',
    "versions/6.json": '{"version": true}',
    "versions/7.json": b"\xff\xfe binary",
    "aliases/production/00000002.json": '{"alias": "production"}',
    "aliases/production/00000003.json": "",
    "claims/9.json": "{",
}


def test_corrupt_records_are_named_on_stderr_and_skipped(reg: str, capsys: pytest.CaptureFixture) -> None:
    _version(reg), _version(reg, "other")
    registry.promote(reg, NAME, "production", 1)
    for rel, text in CORRUPT.items():
        data = text if isinstance(text, bytes) else text.encode()
        storage.write_bytes(storage.join(reg, NAME, registry.META, rel), data)
    storage.write_text(storage.join(reg, "Bad Name", registry.META, "claims", "1.json"), "{}")
    storage.write_text(storage.join(reg, NAME, registry.META, "aliases", "Bad", "00000001.json"), "{}")
    where = ["--registry", reg]
    for argv in (
        ["list"], ["list", NAME], ["list", NAME, "--json"], ["history", NAME], ["serving-config"],
        ["fsck", "--dry-run", "--grace-hours", "0"], ["gc", "--dry-run", "--grace-hours", "0"],
    ):  # fmt: skip
        code, out, err = _cli(capsys, "registry", *argv, *where)
        assert code == 0 and "Traceback" not in err, (argv, err)
        assert "finetune: warning: skipped" in err, argv
    code, out, err = _cli(capsys, "registry", "list", *where)
    assert "beans  1" in out and "other" in out and "production=1" in out
    for rel in ("versions/2.json", "versions/3.json", "versions/5.json", "aliases/production/00000003.json"):
        assert storage.join(reg, NAME, registry.META, rel) in err, rel
    assert "field 'version'" in err and "'Bad Name' is not a valid model name" in err
    code, out, err = _cli(capsys, "registry", "gc", "--dry-run", "--grace-hours", "0", *where)
    assert storage.join(reg, NAME, registry.META, "claims", "9.json") in err
    code, _, err = _cli(capsys, "registry", "show", NAME, "2", *where)
    assert code == 1 and "versions/2.json" in err and "corrupt" in err
    # The alias moves on past its corrupt entries (their numbers stay taken).
    assert registry.promote(reg, NAME, "production", 1) is None
    _version(reg)  # 10: above the corrupt claim's number
    move = registry.promote(reg, NAME, "production", 10)
    assert move.seq == 4 and registry.resolve_alias(reg, NAME, "production") == 10


def test_registry_list_of_a_corrupt_registry_in_a_real_process(tmp_path) -> None:
    reg = str(tmp_path / "registry")
    _version(reg)
    bad = storage.join(reg, NAME, registry.META, "versions", "2.json")
    storage.write_text(bad, "{oops")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "registry", "list", NAME, "--registry", reg],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"finetune: warning: skipped {bad}: not a registry record" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout.splitlines()[1].startswith("1 ")


def test_fsck_quarantines_a_loadable_folder_without_commit_record(
    reg: str, capsys: pytest.CaptureFixture
) -> None:
    """What a push of an older finetune left when killed after its rename: TF Serving loads it."""
    _version(reg)
    number = registry.claim_version(reg, NAME, {"who": "old-finetune", "claimed": OLD})
    for rel in ("saved_model.pb", "variables/variables.index", "assets.extra/push.json"):
        storage.write_bytes(storage.join(registry.version_uri(reg, NAME, number), rel), b"x")
    foreign = storage.join(registry.version_uri(reg, NAME, 7), "saved_model.pb")
    storage.write_bytes(foreign, b"not made by a push")  # no claim: left alone, reported
    assert loadable_but_uncommitted(reg, NAME) == [2, 7]
    code, out, _ = _cli(capsys, "registry", "fsck", "--registry", reg, "--grace-hours", "0")
    assert code == 0 and f"quarantined: {registry.version_uri(reg, NAME, 2)}" in out
    assert "no claim: not made by a push; left alone" in out
    assert loadable_versions(reg, NAME) == [1, 7] and loadable_but_uncommitted(reg, NAME) == [7]
    quarantine = registry.meta_uri(reg, NAME, "quarantine")
    files = {"/".join(registry.relative(i.uri, quarantine)[1:]) for i in storage.list_files(quarantine)}
    assert files == {"reason.json", "version/saved_model.pb", "version/variables/variables.index",
                     "version/assets.extra/push.json"}  # fmt: skip
    assert [registry.claim_version(reg, NAME, {}) for _ in range(4)] == [3, 4, 5, 6]
    assert registry.claim_version(reg, NAME, {}) == 8  # 2 (quarantined) and 7 (foreign) are skipped


def test_gc_removes_dead_claims_staging_and_fingerprints_after_the_grace_period(
    reg: str, capsys: pytest.CaptureFixture
) -> None:
    meta = registry.meta_uri(reg, NAME)
    _version(reg)
    dead = [registry.claim_version(reg, NAME, {"claimed": OLD}) for _ in range(2)]  # 2, 3
    young = registry.claim_version(reg, NAME, {"claimed": registry_now()})  # 4, a push in flight
    highest = registry.claim_version(reg, NAME, {"claimed": OLD})  # 5
    storage.write_text(storage.join(meta, "staging", "20000101T000000Z-old", "saved_model.pb"), "x")
    storage.write_text(storage.join(meta, "staging", "29990101T000000Z-new", "saved_model.pb"), "x")
    print_ = storage.join(meta, "fingerprints", "a" * 64 + ".json")
    storage.write_text(print_, json.dumps({"claimed": OLD}))
    before = {i.uri for i in storage.list_files(meta)}
    code, out, _ = _cli(capsys, "registry", "gc", "--registry", reg, "--dry-run")
    assert code == 0 and "would be removed" in out and {i.uri for i in storage.list_files(meta)} == before

    code, out, _ = _cli(capsys, "registry", "gc", NAME, "--registry", reg)
    assert code == 0 and "gc: changed 4 thing(s)" in out, out
    left = {"/".join(registry.relative(i.uri, meta)) for i in storage.list_files(meta)}
    assert {f"claims/{n}.json" for n in dead}.isdisjoint(left) and print_ not in left
    assert {"claims/1.json", f"claims/{young}.json", f"claims/{highest}.json"} <= left
    assert "staging/29990101T000000Z-new/saved_model.pb" in left
    assert not any(p.startswith("staging/20000101T000000Z-old") for p in left)
    assert "within the grace period" in out and "kept so that it is never reused" in out
    assert registry.claim_version(reg, NAME, {}) == highest + 1


def registry_now() -> str:
    from components.core.stamps import utc_now

    return utc_now()


def test_gc_ages_an_unnamed_local_staging_folder_by_its_files(tmp_path, capsys) -> None:
    reg = str(tmp_path / "registry")
    _version(reg)
    legacy = os.path.join(registry.meta_uri(reg, NAME), "staging", "0123456789abcdef")
    storage.write_text(os.path.join(legacy, "saved_model.pb"), "x")
    code, out, _ = _cli(capsys, "registry", "gc", "--registry", reg)
    assert code == 0 and "within the grace period" in out and os.path.isdir(legacy)
    os.utime(os.path.join(legacy, "saved_model.pb"), (0, 0))
    code, out, _ = _cli(capsys, "registry", "gc", "--registry", reg)
    assert code == 0 and "removed: " in out and not os.path.exists(legacy)
    code, _, err = _cli(capsys, "registry", "gc", "--registry", reg, "--grace-hours", "-1")
    assert code == 2 and "--grace-hours" in err
    assert serving.models_config(reg, [NAME])
