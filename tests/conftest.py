"""Shared test fixtures: an in-process GCS emulator on loopback.

Tests that touch ``gs://`` use the ``gcs_prefix`` fixture (or ``gcs_emulator``
directly) and carry the ``gcs`` marker, registered below so no pytest.ini is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# The tests train in-process, as `finetune train` does: its TensorFlow options (pipeline.cli),
# set before any test imports TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

EMULATOR_BUCKET = "test-bucket"
EMULATOR_PROJECT = "test-project"


def pytest_configure(config: pytest.Config) -> None:
    """Registers the ``gcs`` marker (tests that talk to the GCS emulator)."""
    config.addinivalue_line("markers", "gcs: needs the in-process GCS emulator (gcs_emulator fixture)")


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: ``host`` is the STORAGE_EMULATOR_HOST value."""

    host: str
    bucket: str

    def uri(self, *parts: str) -> str:
        """Returns ``gs://<bucket>/<parts...>``."""
        return "/".join([f"gs://{self.bucket}", *(p.strip("/") for p in parts)])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """Starts gcp-storage-emulator on 127.0.0.1 for the whole session.

    Both google-cloud-storage and Beam's GcsIO read ``STORAGE_EMULATOR_HOST`` each time
    they build a ``storage.Client`` (Beam builds a new one per GcsIO, and a new GcsIO per
    filesystem call), so setting it here is enough to route every gs:// call to loopback.

    Beam's GcsIO always asks ``google.auth.default()`` for credentials first and, when
    none exist, retries with exponential backoff (about 25 s) before going anonymous.
    We point ``GOOGLE_APPLICATION_CREDENTIALS`` at an ``authorized_user`` file holding a
    dummy token with an explicit far-future ``expiry`` (without one, google-auth treats
    the token as already expired and refreshes it at oauth2.googleapis.com before every
    request): resolution is instant, nothing is ever refreshed, no request leaves the
    machine, and the emulator ignores the Authorization header. Real credentials on the
    developer's machine are never picked up, as long as nothing in the process built a
    Beam GcsIO before this fixture ran (Beam caches the credentials it finds per process).
    """
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)  # per-request chatter
    logging.getLogger("api").setLevel(logging.WARNING)
    adc = tmp_path_factory.mktemp("gcs-emulator") / "dummy-adc.json"
    adc.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "emulator",
                "client_secret": "emulator",
                "refresh_token": "emulator",
                "token": "emulator-dummy-token",
                "expiry": "2999-01-01T00:00:00Z",
            }
        )
    )

    server = None
    for _ in range(5):
        # The emulator binds inside its own thread and Server.start() waits without a
        # timeout, so a port taken between probing and binding would hang start():
        # start it from a helper thread and try another port if it does not come up.
        port = _free_port()
        candidate = create_server("127.0.0.1", port, in_memory=True)
        starter = threading.Thread(target=candidate.start, daemon=True)
        starter.start()
        starter.join(timeout=10)
        if not starter.is_alive():
            server = candidate
            break
    if server is None:
        pytest.fail("could not start gcp-storage-emulator on 127.0.0.1")

    host = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", host)
        mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
        mp.setenv("GOOGLE_CLOUD_PROJECT", EMULATOR_PROJECT)
        try:
            client = storage.Client(project=EMULATOR_PROJECT, credentials=AnonymousCredentials())
            client.create_bucket(EMULATOR_BUCKET)
            yield GcsEmulator(host=host, bucket=EMULATOR_BUCKET)
        finally:
            server.stop()


@pytest.fixture
def gcs_prefix(gcs_emulator: GcsEmulator) -> str:
    """A fresh ``gs://test-bucket/<uuid>`` prefix (no trailing slash) for one test."""
    return gcs_emulator.uri(uuid.uuid4().hex)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run directory whose ``preprocess/`` holds 90 colour images at 32 px (70% train,
    30% eval, 2 shards each), made once per session by the real preprocessing stage."""
    from components.config import load_config
    from components.preprocess import stage
    from tests.train_helpers import TINY_SIZE, make_colour_images

    root = tmp_path_factory.mktemp("tiny")
    make_colour_images(str(root / "images"))
    config = load_config(
        None,
        [
            f"data.source={root / 'images'}",
            f"run_dir={root / 'run'}",
            f"model.image_size={TINY_SIZE}",
            "data.split={train: 0.7, eval: 0.3, test: 0.0}",
            "preprocess.num_workers=1",
            "preprocess.num_shards=2",
        ],
    )
    summary = stage.run(config)
    assert summary["records"]["train"] > 40 and summary["records"]["eval"] > 15, summary["records"]
    return str(root / "run")


class _Tee(io.TextIOBase):
    """Writes to several text streams at once (keeps a copy of what is printed)."""

    def __init__(self, *streams: Any) -> None:
        super().__init__()
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run trained once per session: ``run_dir``, the summary ``stage.run`` returned and
    what the stage printed. Tests must not change ``run_dir``: copy it first
    (``train_helpers.copy_trained``)."""

    run_dir: str
    summary: dict
    printed: str


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """90 colour images at 32 px split 60/20/20 (53 train, 14 eval, 23 test images),
    preprocessed and trained with ``train_helpers.train_config`` (no overrides) once per
    session, by the real stages; shared by the training and the evaluation tests."""
    from components.config import load_config
    from components.preprocess import stage
    from components.train import stage as train_stage
    from tests.train_helpers import TINY_SIZE, make_colour_images, train_config

    root = tmp_path_factory.mktemp("tiny_trained")
    make_colour_images(str(root / "images"))
    run_dir = str(root / "run")
    stage.run(
        load_config(
            None,
            [
                f"data.source={root / 'images'}",
                f"run_dir={run_dir}",
                f"model.image_size={TINY_SIZE}",
                "data.split={train: 0.6, eval: 0.2, test: 0.2}",
                "preprocess.num_workers=1",
                "preprocess.num_shards=2",
            ],
        )
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        summary = train_stage.run(train_config(run_dir))
    return TrainedRun(run_dir, summary, printed.getvalue())


@pytest.fixture(scope="session")
def tiny_trained(tiny_training: TrainedRun) -> str:
    """The run directory of ``tiny_training`` (read only: copy it to change anything)."""
    return tiny_training.run_dir
