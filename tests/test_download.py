"""data.download: real archives served over real HTTP on loopback, extracted into data.source."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from components.config import load_config, to_yaml
from components.core import storage
from components.core.errors import ConfigError, StageError
from components.preprocess import download
from components.preprocess.download import archive_suffix, ensure_source, fill_source
from tests.preprocess_helpers import config_for, run_stage

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _image_bytes(fmt: str, colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def split_members(split: str, per_class: int = 2) -> dict[str, bytes]:
    """``<split>/<class>/<image>`` members: a red and a blue class, PNG and JPEG."""
    members = {}
    base = 1000 * ("train", "validation", "test").index(split)
    for c, (label, colour) in enumerate({"red": (220, 20, 20), "blue": (20, 20, 220)}.items()):
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            members[f"{split}/{label}/{split}_{i}.{ext}"] = _image_bytes(fmt, colour, base + 100 * c + i)
    return members


def write_zip(path: str, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: str, members: dict[str, bytes], mode: str = "w:gz") -> str:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_with(path: str, member: tarfile.TarInfo, data: bytes = b"") -> str:
    """A .tar.gz holding one valid image and then ``member``."""
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("train/red/ok.png")
        image = _image_bytes("PNG", (200, 0, 0), 1)
        ok.size = len(image)
        tf.addfile(ok, io.BytesIO(image))
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    return path


def read_tree(root: str) -> dict[str, bytes]:
    return {
        os.path.relpath(f.uri, root).replace(os.sep, "/"): open(f.uri, "rb").read()
        for f in storage.list_files(root)
    }


@dataclass
class Server:
    """Files under ``root`` served at ``url(name)``; ``requests`` records every path asked for."""

    root: str
    base: str
    requests: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def pinned(self, name: str, sha256: str = "") -> dict[str, str]:
        """A ``data.download`` entry for ``name`` with its sha256 (or ``sha256``): plain
        http:// is refused without one."""
        path = os.path.join(self.root, name.split("?")[0].removeprefix("short/"))
        digest = sha256 or (hashlib.sha256(open(path, "rb").read()).hexdigest())
        return {"url": self.url(name), "sha256": digest}

    def flow(self, *names: str) -> str:
        """``data.download=[...]`` for ``--set``: each name pinned, in YAML flow style."""
        return "data.download=[" + ", ".join(json.dumps(self.pinned(n)) for n in names) + "]"


@pytest.fixture
def server(tmp_path, monkeypatch) -> Iterator[Server]:
    """A real http.server on 127.0.0.1 in a thread. ``/short/<name>`` announces more bytes
    than it sends (a connection cut mid-download)."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    state = Server(root=str(root), base="")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            state.requests.append(self.path)
            if self.path.startswith("/short/"):
                data = (root / self.path[len("/short/") :]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) * 2))
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _leftovers(parent: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.endswith(".download")]


def test_downloads_and_extracts_zip_and_tar_archives_into_a_missing_source(
    server, tmp_path, capfd, monkeypatch
):
    monkeypatch.setattr(download, "PROGRESS_SECONDS", 0.0)  # a progress line after every chunk
    train, validation, test = split_members("train"), split_members("validation"), split_members("test")
    write_zip(os.path.join(server.root, "train.zip"), train)
    write_tar(os.path.join(server.root, "validation.tar.gz"), validation)
    write_tar(os.path.join(server.root, "test.tgz"), test)
    write_tar(os.path.join(server.root, "extra.tar"), {"test/red/plain_tar.png": b"x"}, mode="w")
    source = str(tmp_path / "data" / "beans")
    urls = [server.pinned(n) for n in ("train.zip", "validation.tar.gz", "test.tgz", "extra.tar?x=1")]

    assert fill_source(source, urls) is True

    assert read_tree(source) == {**train, **validation, **test, "test/red/plain_tar.png": b"x"}
    assert _leftovers(str(tmp_path / "data")) == []
    err = capfd.readouterr().err
    size = os.path.getsize(os.path.join(server.root, "train.zip")) / 1e6
    assert f"[download] train.zip {size:.1f}/{size:.1f} MB\n" in err
    assert f"[download] train.zip {size:.1f}/{size:.1f} MB done\n" in err
    assert f"files extracted into {source}" in err


def test_an_empty_source_folder_is_filled(server, tmp_path):
    write_zip(os.path.join(server.root, "train.zip"), split_members("train"))
    source = tmp_path / "beans"
    (source / "empty" / "sub").mkdir(parents=True)
    assert fill_source(str(source), [server.pinned("train.zip")])
    assert sorted(os.listdir(source)) == ["train"]


def test_a_source_with_files_is_used_as_it_is_without_any_request(server, tmp_path):
    write_zip(os.path.join(server.root, "train.zip"), split_members("train"))
    source = tmp_path / "beans"
    (source / "train" / "red").mkdir(parents=True)
    (source / "train" / "red" / "mine.jpg").write_bytes(b"mine")
    config = config_for(str(source), str(tmp_path / "run"), server.flow("train.zip"))

    ensure_source(config)

    assert server.requests == []
    assert read_tree(str(source)) == {"train/red/mine.jpg": b"mine"}


def test_no_download_configured_does_nothing(tmp_path):
    assert fill_source(str(tmp_path / "absent"), []) is False
    assert not (tmp_path / "absent").exists()


def _assert_failed(urls, source, *expected, fix="set data.source"):
    """The download fails with ``expected`` and ``fix`` in the error, and leaves nothing."""
    with pytest.raises(StageError) as error:
        fill_source(str(source), urls)
    text = str(error.value)
    for part in (*expected, fix):
        assert part in text, text
    assert not source.exists()
    assert _leftovers(str(source.parent)) == []
    return text


def test_http_404_names_the_url_and_leaves_no_source(server, tmp_path):
    write_zip(os.path.join(server.root, "train.zip"), split_members("train"))
    missing = server.url("missing.zip")
    entries = [server.pinned("train.zip"), {"url": missing, "sha256": "0" * 64}]
    _assert_failed(entries, tmp_path / "beans", missing, "HTTP 404")


def test_corrupt_and_truncated_archives_fail_with_the_url(server, tmp_path):
    write_zip(os.path.join(server.root, "train.zip"), split_members("train"))
    (tmp_path / "served" / "bad.zip").write_bytes(b"<html>Access denied</html>" * 20)
    (tmp_path / "served" / "bad.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    good = server.pinned("train.zip")
    _assert_failed([good, server.pinned("bad.zip")], tmp_path / "a", "bad.zip", "not a valid .zip archive")
    _assert_failed([server.pinned("bad.tar.gz")], tmp_path / "b", "bad.tar.gz", "not a valid .tar.gz archive")
    short = server.pinned("short/train.zip")
    _assert_failed([short], tmp_path / "c", short["url"], "the connection closed after")


def test_an_unreachable_host_fails_with_the_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/train.zip"
    _assert_failed([{"url": url, "sha256": "0" * 64}], tmp_path / "beans", url, "cannot reach the server")


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (tarfile.TarInfo("train/../../evil.png"), "'..' path component"),
        (tarfile.TarInfo("/tmp/evil.png"), "absolute path"),
        (_symlink("train/red/link.png", "/etc/passwd"), "train/red/link.png"),
        (_symlink("train/escape", "../../.."), "train/escape"),
    ],
)
def test_unsafe_tar_members_are_rejected(tmp_path, member, why):
    archive = tar_with(str(tmp_path / "evil.tar.gz"), member, b"pwned")
    text = _assert_failed([archive], tmp_path / "out" / "beans", "unsafe archive member", why)
    assert archive in text
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()


def test_unsafe_zip_members_are_rejected(tmp_path):
    archive = str(tmp_path / "evil.zip")
    write_zip(archive, {"train/red/ok.png": b"ok", "../evil.png": b"pwned"})
    _assert_failed([archive], tmp_path / "out" / "beans", "unsafe archive member '../evil.png'")
    assert not (tmp_path / "out" / "evil.png").exists()

    linked = str(tmp_path / "link.zip")
    with zipfile.ZipFile(linked, "w") as zf:
        info = zipfile.ZipInfo("train/red/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    _assert_failed([linked], tmp_path / "out" / "beans", "symbolic link")


def test_the_same_file_from_two_archives_is_an_error(tmp_path):
    first = write_zip(str(tmp_path / "a.zip"), {"train/red/x.png": b"1"})
    second = write_tar(str(tmp_path / "b.tar"), {"train/red/x.png": b"2"}, mode="w")
    _assert_failed(
        [first, second], tmp_path / "beans", "'train/red/x.png' was already extracted", fix="duplicates"
    )


def test_archives_from_a_local_path_and_macos_metadata_skipped(tmp_path):
    members = split_members("train")
    archive = write_zip(
        str(tmp_path / "train.zip"), {**members, "__MACOSX/train/._x.png": b"meta", "train/.DS_Store": b"ds"}
    )
    source = tmp_path / "beans"
    assert fill_source(str(source), [archive])
    assert read_tree(str(source)) == members
    missing = str(tmp_path / "absent.zip")
    _assert_failed([missing], tmp_path / "other", missing, "no such file")


@pytest.mark.gcs
def test_archives_from_gcs(gcs_prefix, tmp_path):
    members = split_members("train")
    uri = storage.join(gcs_prefix, "train.zip")
    storage.write_bytes(uri, open(write_zip(str(tmp_path / "t.zip"), members), "rb").read())
    source = tmp_path / "beans"
    assert fill_source(str(source), [uri])
    assert read_tree(str(source)) == members


def test_archive_suffixes():
    assert archive_suffix("https://h/x/train.zip?alt=media#f") == ".zip"
    assert archive_suffix("gs://b/x.TAR.GZ") == ".tar.gz"
    assert archive_suffix("/data/x.tgz") == ".tgz"
    assert archive_suffix("https://h/x.gz") == ""


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.download=[https://h/train.rar]"],
            "data.download[0]: 'https://h/train.rar' is not an archive",
        ),
        (["data.download=https://h/train.zip"], "data.download: expected a list"),
        (["data.download=[ftp://h/a.zip]"], "data.download[0]: 'ftp://h/a.zip' must be an https://"),
        (
            ["data.source=gs://b/beans", "data.download=[https://h/a.zip]"],
            "data.download: only fills a local",
        ),
        (
            ["data.source=/x/images.csv", "data.download=[https://h/a.zip]"],
            "data.download: only fills a local",
        ),
    ],
)
def test_download_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.source=/a", "run_dir=/r", *overrides])
    assert message in str(error.value)


def test_download_list_parses_and_round_trips(tmp_path):
    pinned = {"url": "http://h/d.zip", "sha256": "ab" * 32}
    config = load_config(
        None,
        ["data.source=data/beans", "run_dir=r", f"data.download=[a.zip, gs://b/c.tgz, {json.dumps(pinned)}]"],
    )
    assert config.data.download == ["a.zip", "gs://b/c.tgz", pinned]
    assert load_config(None, ["data.source=a", "run_dir=r"]).data.download == []
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config))
    assert load_config(str(path)) == config


def test_the_beans_config_downloads_the_ibean_split_archives():
    config = load_config(os.path.join(CONFIGS, "beans.yaml"), ["data.source=data/beans"])
    assert [os.path.basename(u) for u in config.data.download] == ["train.zip", "validation.zip", "test.zip"]
    assert all(u.startswith("https://") for u in config.data.download)


# --- the preprocessing stage -----------------------------------------------------------


def test_preprocess_stage_runs_on_a_downloaded_dataset(server, tmp_path):
    write_zip(os.path.join(server.root, "train.zip"), split_members("train", per_class=8))
    write_tar(os.path.join(server.root, "validation.tar.gz"), split_members("validation", per_class=2))
    write_zip(os.path.join(server.root, "test.zip"), split_members("test", per_class=2))
    download = server.flow("train.zip", "validation.tar.gz", "test.zip")
    source = str(tmp_path / "data" / "beans")

    summary = run_stage(source, str(tmp_path / "run"), download, "preprocess.num_shards=1")

    assert summary["status"] == "ok" and summary["layout"] == "split_folders"
    assert sorted(summary["classes"]) == ["blue", "red"]
    assert summary["records"] == {"train": 16, "eval": 4, "test": 4}
    assert len(server.requests) == 3
