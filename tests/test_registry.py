"""The registry's bookkeeping, on a local directory and on fake-gcs-server (real generation
preconditions): version claims, commit records, aliases moved by compare-and-swap, the
history, rollback, TF Serving's models.config and the ``finetune registry`` commands."""

from __future__ import annotations

import json
import threading

import pytest
from google.protobuf import text_format

from components import registry
from components.core import storage
from components.core.errors import StageError
from pipeline import cli
from tests.registry_helpers import fake_gcs_prefix, fake_gcs_server, reg  # noqa: F401 - fixtures

NAME = "beans"


def _version(reg: str, **record) -> int:
    """A committed version whose SavedModel is a stand-in file (bookkeeping only)."""
    number = registry.claim_version(reg, NAME, {"who": "test"})
    storage.write_bytes(storage.join(registry.version_uri(reg, NAME, number), "saved_model.pb"), b"graph")
    registry.commit_version(reg, NAME, number, {"fingerprint": f"fp-{number}", **record})
    return number


def test_claims_are_exclusive_and_racing_claims_get_distinct_numbers(reg: str) -> None:
    results: list[int] = []
    barrier = threading.Barrier(6)

    def claim() -> None:
        barrier.wait()
        results.append(registry.claim_version(reg, NAME, {"who": threading.current_thread().name}))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    # A claimed number never counts as a version until its commit record exists.
    assert registry.versions(reg, NAME) == []
    with pytest.raises(StageError, match="no version 3"):
        registry.get_version(reg, NAME, 3)
    assert registry.claim_version(reg, NAME, {}) == 7


def test_create_exclusive_has_exactly_one_winner(reg: str) -> None:
    path = storage.join(reg, "lock.json")
    storage.create_exclusive(path, b"first")
    with pytest.raises(storage.AlreadyExists):
        storage.create_exclusive(path, b"second")
    assert storage.read_bytes(path) == b"first"


def test_versions_records_and_model_names(reg: str) -> None:
    assert registry.model_names(reg) == []
    first = _version(reg, labels=["a", "b"])
    second = _version(reg)
    assert (first, second) == (1, 2)
    assert [r["version"] for r in registry.versions(reg, NAME)] == [1, 2]
    assert registry.get_version(reg, NAME, 1)["labels"] == ["a", "b"]
    assert registry.find_by_fingerprint(reg, NAME, "fp-2") == 2
    assert registry.find_by_fingerprint(reg, NAME, "other") is None
    assert registry.model_names(reg) == [NAME]
    with pytest.raises(StageError, match="already committed"):
        registry.commit_version(reg, NAME, 2, {})


def test_promote_rollback_and_history(reg: str) -> None:
    v1, v2, v3 = _version(reg), _version(reg), _version(reg)
    assert registry.resolve_alias(reg, NAME, "production") is None
    registry.promote(reg, NAME, "production", v1, reason="first")
    registry.promote(reg, NAME, "production", v2)
    assert registry.promote(reg, NAME, "production", v2) is None  # already there: no new entry
    registry.promote(reg, NAME, "staging", v3)
    registry.promote(reg, NAME, "production", v3)
    assert registry.aliases_of(reg, NAME) == {"production": v3, "staging": v3}

    back = registry.rollback(reg, NAME, "production", reason="bad latency")
    assert (back.previous, back.version, back.action) == (v3, v2, "rollback")
    assert registry.resolve_alias(reg, NAME, "production") == v2
    assert registry.rollback(reg, NAME, "production").version == v1  # a stack: back once more
    with pytest.raises(StageError, match="nothing to roll back to"):
        registry.rollback(reg, NAME, "production")

    moves = registry.alias_history(reg, NAME, "production")
    assert [(m.seq, m.action, m.previous, m.version) for m in moves] == [
        (1, "promote", None, v1),
        (2, "promote", v1, v2),
        (3, "promote", v2, v3),
        (4, "rollback", v3, v2),
        (5, "rollback", v2, v1),
    ]
    assert moves[0].reason == "first" and moves[3].reason == "bad latency"
    assert all("@" in m.who and m.when.endswith("Z") for m in moves)
    assert len(registry.history(reg, NAME)) == 6  # both aliases


def test_promote_refuses_missing_or_incomplete_versions(reg: str) -> None:
    _version(reg)
    with pytest.raises(StageError, match="no version 9"):
        registry.promote(reg, NAME, "production", 9)
    claimed = registry.claim_version(reg, NAME, {})
    registry.commit_version(reg, NAME, claimed, {})  # committed, but no saved_model.pb
    with pytest.raises(StageError, match=f"version {claimed} of 'beans' is not complete.*no saved_model.pb"):
        registry.promote(reg, NAME, "production", claimed)


def test_racing_promotions_have_exactly_one_winner(reg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = [_version(reg) for _ in range(4)]
    registry.promote(reg, NAME, "production", versions[0])
    # Every racer reads the history, then all write at once: the real race, made certain.
    barrier = threading.Barrier(3)
    real = registry._alias_log  # the one read that promote's compare-and-swap is based on
    waited: set[int] = set()

    def read_then_wait(*args):
        moves = real(*args)
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            barrier.wait(timeout=30)
        return moves

    monkeypatch.setattr(registry, "_alias_log", read_then_wait)
    outcomes: dict[int, object] = {}

    def promote(version: int) -> None:
        try:
            outcomes[version] = registry.promote(reg, NAME, "production", version)
        except registry.AliasConflict as e:
            outcomes[version] = e

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(registry, "_alias_log", real)
    winners = [v for v, o in outcomes.items() if isinstance(o, registry.AliasMove)]
    losers = [o for o in outcomes.values() if isinstance(o, registry.AliasConflict)]
    assert len(winners) == 1 and len(losers) == 2, outcomes
    assert all("nothing was changed" in str(e) and f"to version {winners[0]}" in str(e) for e in losers)
    assert registry.resolve_alias(reg, NAME, "production") == winners[0]
    assert [m.seq for m in registry.alias_history(reg, NAME, "production")] == [1, 2]


def test_serving_config_labels_follow_the_aliases(reg: str) -> None:
    from tensorflow_serving.config import model_server_config_pb2

    from components.push import serving

    v1, v2, v3 = _version(reg), _version(reg), _version(reg)
    registry.promote(reg, NAME, "production", v1)
    registry.promote(reg, NAME, "staging", v2)
    text = serving.models_config(reg, [NAME], base_path="/models")
    parsed = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (entry,) = parsed.model_config_list.config
    assert entry.name == NAME and entry.base_path == f"/models/{NAME}"
    assert entry.model_platform == "tensorflow"
    assert list(entry.model_version_policy.specific.versions) == [v1, v2, v3]
    assert dict(entry.version_labels) == {"production": v1, "staging": v2}


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_registry_commands(tmp_path, capsys: pytest.CaptureFixture) -> None:
    reg = str(tmp_path / "registry")
    v1 = _version(reg, verdict={"metric": "accuracy", "candidate": 0.93, "baseline": 0.84})
    v2 = _version(reg)
    code, out, _ = _cli(
        capsys, "registry", "promote", NAME, str(v1), "--alias", "production", "--registry", reg
    )
    assert code == 0 and "unset -> version 1" in out
    _cli(capsys, "registry", "promote", NAME, str(v2), "--alias", "production", "--registry", reg)

    code, out, _ = _cli(capsys, "registry", "list", "--registry", reg)
    assert code == 0 and NAME in out and "production=2" in out
    code, out, _ = _cli(capsys, "registry", "list", NAME, "--json", "--registry", reg)
    listed = json.loads(out)
    assert [r["version"] for r in listed["versions"]] == [1, 2] and listed["aliases"] == {"production": 2}
    code, out, _ = _cli(capsys, "registry", "list", NAME, "--registry", reg)
    assert "0.9300" in out and "0.8400" in out
    code, out, _ = _cli(capsys, "registry", "show", NAME, "1", "--json", "--registry", reg)
    assert json.loads(out)["verdict"]["candidate"] == 0.93

    code, out, _ = _cli(capsys, "registry", "rollback", NAME, "--alias", "production", "--registry", reg)
    assert code == 0 and "version 2 -> 1" in out
    code, out, _ = _cli(capsys, "registry", "history", NAME, "--json", "--registry", reg)
    assert [(m["action"], m["version"]) for m in json.loads(out)] == [
        ("promote", 1),
        ("promote", 2),
        ("rollback", 1),
    ]
    config = tmp_path / "models.config"
    code, out, _ = _cli(capsys, "registry", "serving-config", "--out", str(config), "--registry", reg)
    assert code == 0 and 'key: "production"' in config.read_text()

    # Errors: a version that does not exist, and no registry at all.
    code, _, err = _cli(capsys, "registry", "promote", NAME, "7", "--alias", "production", "--registry", reg)
    assert code == 1 and "no version 7" in err
    code, _, err = _cli(capsys, "registry", "list")
    assert code == 2 and "--registry URI" in err
    code, _, err = _cli(capsys, "registry", "promote", NAME, "1", "--alias", "Bad Name", "--registry", reg)
    assert code == 2 and "alias" in err
