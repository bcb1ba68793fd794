"""Hostile archives in data.download: each protection against a real archive built here.

Links and special members, unsafe names, decompression bombs, member floods, pinned
digests and plain http://. Every refusal must leave data.source absent, no temporary folder,
and nothing written outside it.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import ssl
import stat
import struct
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator

import pytest

from components.config import DownloadLimitsConfig, load_config
from components.core.errors import ConfigError, StageError
from components.preprocess.download import Archive, fill_source
from pipeline.cli import main
from tests.test_download import read_tree, server  # noqa: F401 (the fixture)

PNG = b"\x89PNG\r\n\x1a\n" + b"not really an image"


def add(
    tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b""
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: str, *members: tuple, mode: str = "w:gz") -> str:
    """A tar holding one harmless file, then ``members`` as ``add`` arguments."""
    with tarfile.open(path, mode) as tf:
        add(tf, "train/red/ok.png", data=PNG)
        for member in members:
            add(tf, *member)
    return path


def make_zip(path: str, members: dict[str, bytes], modes: dict[str, int] | None = None) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.create_system, info.external_attr = 3, modes[name] << 16
            zf.writestr(info, data)
    return path


def refused(entries: list, source, *expected: str, limits: DownloadLimitsConfig | None = None) -> str:
    """The download fails naming ``expected``; data.source and the temporary folder are absent."""
    with pytest.raises(StageError) as error:
        fill_source(str(source), entries, limits)
    text = str(error.value)
    for part in expected:
        assert part in text, text
    assert not os.path.exists(source)
    assert [n for n in os.listdir(source.parent) if n.endswith(".download")] == []
    return text


# --- links and special files -------------------------------------------------------------


def cve_2025_4517_tar(path: str, root: str) -> str:
    """The public PoC shape of CVE-2025-4517 (CPython's test_realpath_limit_attack): a chain
    of long folder names and one-letter symlinks to them, so that a last symlink's resolved
    path exceeds PATH_MAX and ``os.path.realpath`` stops resolving it; through it, ``escape``
    points two levels above ``root`` and a file is written there."""
    steps = "abcdefghijklmnop"
    component = "d" * ((4096 - len(root) - 1) // (len(steps) + 1))
    with tarfile.open(path, "w:gz") as tf:
        deep = ""
        for step in steps:
            add(tf, os.path.join(deep, component), tarfile.DIRTYPE)
            add(tf, os.path.join(deep, step), tarfile.SYMTYPE, component)
            deep = os.path.join(deep, component)
        long_link = os.path.join(*steps, "l" * 254)
        add(tf, long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add(tf, "escape", tarfile.SYMTYPE, os.path.join(long_link, "..", ".."))
        add(tf, "escape/pwned.txt", data=b"pwned")
    return path


def test_cve_2025_4517_symlink_chain_is_refused_and_writes_nothing_outside(tmp_path):
    source = tmp_path / "data" / "beans"
    source.parent.mkdir()
    tree = str(source.parent / ".beans.download" / "tree")  # where the archive would extract
    archive = cve_2025_4517_tar(str(tmp_path / "evil.tar.gz"), tree)
    with tarfile.open(archive) as tf:  # the attack passes tarfile's own data filter
        assert all(tarfile.data_filter(m, tree) for m in tf.getmembers())

    text = refused([archive], source, "unsafe archive member 'a'", "symbolic link", "Nothing was extracted")

    assert archive in text
    assert not (source.parent / "pwned.txt").exists()  # two levels above the extraction root
    assert os.listdir(source.parent) == []


def test_a_hard_link_is_refused_even_to_a_file_inside(tmp_path):
    archive = make_tar(
        str(tmp_path / "h.tar.gz"), ("train/red/copy.png", tarfile.LNKTYPE, "train/red/ok.png")
    )
    refused(
        [archive], tmp_path / "beans", "'train/red/copy.png': hard link", "only regular files and folders"
    )


@pytest.mark.parametrize(
    "kind, name",
    [(tarfile.FIFOTYPE, "FIFO"), (tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device")],
)
def test_fifos_and_devices_in_a_tar_are_refused(tmp_path, kind, name):
    archive = make_tar(str(tmp_path / "s.tar"), ("train/red/odd.png", kind), mode="w")
    refused([archive], tmp_path / "beans", f"'train/red/odd.png': {name}")


@pytest.mark.parametrize(
    "mode, name",
    [
        (stat.S_IFLNK | 0o777, "symbolic link"),
        (stat.S_IFIFO | 0o644, "FIFO"),
        (stat.S_IFCHR | 0o600, "character"),
    ],
)
def test_zip_symlinks_and_special_members_are_refused(tmp_path, mode, name):
    members = {"train/red/ok.png": PNG, "train/red/link.png": b"/etc/passwd"}
    archive = make_zip(str(tmp_path / "l.zip"), members, {"train/red/link.png": mode})
    refused([archive], tmp_path / "beans", f"'train/red/link.png': {name}")


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("../evil.png", "'..' path component"),
        ("train/../../evil.png", "'..' path component"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("train\\..\\..\\evil.png", "backslash"),
        ("train/red/\x1b[2Jevil.png", "control character"),
        ("train/red/a\nb.png", "control character"),
        ("train/red/\udcffevil.png", "not valid UTF-8"),
        ("train/red/" + "x" * 256, "component longer than 255 bytes"),
        ("train/" + "abcdefgh/" * 120 + "x.png", "name longer than 1024 bytes"),
    ],
)
def test_unsafe_names_are_refused_in_tar_and_zip(tmp_path, name, why):
    tar = make_tar(str(tmp_path / "n.tar"), (name, tarfile.REGTYPE, "", b"pwned"), mode="w")
    text = refused([tar], tmp_path / "out" / "a", why)
    assert "\x1b" not in text and "\n" not in text  # shown escaped, never sent to the terminal
    if "\udcff" not in name:  # a zip name is always text
        archive = make_zip(str(tmp_path / "n.zip"), {"train/red/ok.png": PNG, name: b"pwned"})
        refused([archive], tmp_path / "out" / "b", why)
    assert os.listdir(tmp_path / "out") == []


def test_files_get_default_modes_never_the_archives_setuid_bits(tmp_path):
    archive = str(tmp_path / "m.tar")
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("train/red/run.png")
        info.size, info.mode = len(PNG), 0o6777
        tf.addfile(info, io.BytesIO(PNG))
    assert fill_source(str(tmp_path / "beans"), [archive])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "beans" / "train" / "red" / "run.png").st_mode) == 0o666 & ~umask


# --- limits ------------------------------------------------------------------------------

BOMB_BYTES = 50 * 2**20


def test_a_tar_gz_bomb_is_refused_over_the_ratio_and_the_size_limits(tmp_path):
    archive = make_tar(
        str(tmp_path / "bomb.tar.gz"), ("train/red/zeros.png", tarfile.REGTYPE, "", bytes(BOMB_BYTES))
    )
    assert os.path.getsize(archive) < 100_000  # 50 MiB of zeros in under 100 KB
    text = refused(
        [archive],
        tmp_path / "a",
        "expands more than 10 times its size",
        limits=DownloadLimitsConfig(max_ratio=10),
    )
    assert "over data.download_limits.max_ratio" in text and "raise data.download_limits.max_ratio" in text
    refused(
        [archive],
        tmp_path / "b",
        "more than 20 MiB in all (50.0 MiB)",
        "data.download_limits.max_total_mb",
        limits=DownloadLimitsConfig(max_total_mb=20),
    )
    assert fill_source(str(tmp_path / "c"), [archive])  # the defaults allow 100x of 1 MiB
    assert os.path.getsize(tmp_path / "c" / "train" / "red" / "zeros.png") == BOMB_BYTES


def lying_zip(path: str, data: bytes, declared: int) -> str:
    """A zip whose one member's headers (local and central) declare ``declared`` bytes."""
    make_zip(path, {"train/red/x.png": data})
    raw = bytearray(open(path, "rb").read())
    struct.pack_into("<I", raw, raw.index(b"PK\x03\x04") + 22, declared)
    struct.pack_into("<I", raw, raw.index(b"PK\x01\x02") + 24, declared)
    open(path, "wb").write(raw)
    return path


def test_zip_limits_count_the_bytes_written_not_the_headers(tmp_path):
    small = lying_zip(str(tmp_path / "high.zip"), PNG, declared=2**31)  # claims 2 GiB
    assert fill_source(str(tmp_path / "a"), [small], DownloadLimitsConfig(max_total_mb=1))
    assert read_tree(str(tmp_path / "a")) == {"train/red/x.png": PNG}

    bomb = lying_zip(str(tmp_path / "low.zip"), bytes(BOMB_BYTES), declared=1000)  # claims 1 KB
    refused([bomb], tmp_path / "b", "not a valid .zip archive", "Bad CRC-32")

    honest = make_zip(str(tmp_path / "bomb.zip"), {"train/red/a.png": bytes(BOMB_BYTES)})
    refused(
        [honest],
        tmp_path / "c",
        "more than 5 MiB in all (6.0 MiB)",
        limits=DownloadLimitsConfig(max_total_mb=5),
    )


def test_the_member_limit_counts_every_archive_together(tmp_path):
    first = make_zip(str(tmp_path / "a.zip"), {f"train/red/{i}.png": PNG for i in range(15)})
    second = make_tar(
        str(tmp_path / "b.tar.gz"), *[(f"test/red/{i}.png", tarfile.REGTYPE, "", PNG) for i in range(5)]
    )
    limits = DownloadLimitsConfig(max_members=20)
    refused(
        [first, second], tmp_path / "beans", "b.tar.gz: more than 20 members", "max_members", limits=limits
    )
    assert fill_source(str(tmp_path / "ok"), [first], limits)


def test_a_download_stops_at_the_size_limit(server, tmp_path):
    with open(os.path.join(server.root, "big.tar"), "wb") as f:
        f.write(os.urandom(3 * 2**20))
    entry = server.pinned("big.tar")
    refused(
        [entry],
        tmp_path / "beans",
        "the archive is larger than 2 MiB",
        limits=DownloadLimitsConfig(max_total_mb=2),
    )


# --- pinned digests and plain http -----------------------------------------------------------


def test_a_pinned_sha256_extracts_when_it_matches_and_refuses_otherwise(server, tmp_path):
    archive = make_zip(os.path.join(server.root, "train.zip"), {"train/red/ok.png": PNG})
    right = hashlib.sha256(open(archive, "rb").read()).hexdigest()
    assert fill_source(str(tmp_path / "a"), [{"url": archive, "sha256": right.upper()}])
    assert fill_source(str(tmp_path / "b"), [Archive(server.url("train.zip"), right)])  # http:// pinned
    assert read_tree(str(tmp_path / "b")) == {"train/red/ok.png": PNG}

    wrong = "0" * 64
    for entry, source in ((archive, tmp_path / "c"), (server.url("train.zip"), tmp_path / "d")):
        text = refused([{"url": entry, "sha256": wrong}], source, "sha256 mismatch", "Nothing was extracted")
        assert f"expected {wrong}, got {right}" in text


def test_plain_http_without_a_digest_is_refused_at_config_load_and_exits_2(server, tmp_path, capsys):
    url = server.url("train.zip")
    base = ["data.source=/a", "run_dir=/r"]
    with pytest.raises(ConfigError) as error:
        load_config(None, [*base, f"data.download=[{url}]"])
    assert f"data.download[0]: '{url}' is plain http://" in str(error.value)
    assert "use https://, or pin the archive as {url: ..., sha256:" in str(error.value)
    assert main(["config", *[a for s in base for a in ("--set", s)], "--set", f"data.download=[{url}]"]) == 2
    assert "is plain http://" in capsys.readouterr().err
    refused([url], tmp_path / "beans", "http:// is refused without a sha256 digest")  # and below the config
    assert server.requests == []


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"url": "https://h/a.zip", "sha": "ab" * 32}, "unknown key 'sha'; did you mean 'sha256'?"),
        (
            {"url": "https://h/a.zip", "sha256": "xyz"},
            "data.download[0].sha256: 'xyz' must be 64 hexadecimal",
        ),
        ({"url": "https://h/a.zip"}, "data.download[0].sha256: required in a mapping"),
        ({"sha256": "ab" * 32}, "data.download[0].url: required"),
        ({"url": "https://h/a.rar", "sha256": "ab" * 32}, "'https://h/a.rar' is not an archive"),
    ],
)
def test_pinned_entries_are_checked(entry, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.source=/a", "run_dir=/r", f"data.download=[{json.dumps(entry)}]"])
    assert message in str(error.value)


def test_download_limits_are_config_keys_with_checked_ranges():
    base = ["data.source=/a", "run_dir=/r"]
    limits = load_config(None, [*base, "data.download_limits.max_ratio=5"]).data.download_limits
    assert limits == DownloadLimitsConfig(max_total_mb=10_000, max_ratio=5, max_members=100_000)
    with pytest.raises(ConfigError, match="did you mean 'max_members'"):
        load_config(None, [*base, "data.download_limits.max_member=5"])
    with pytest.raises(ConfigError, match="data.download_limits.max_total_mb: 0 must be between 1"):
        load_config(None, [*base, "data.download_limits.max_total_mb=0"])


# --- redirects -------------------------------------------------------------------------------


@pytest.fixture
def tls_redirect(server, tmp_path, monkeypatch) -> Iterator[str]:
    """An https:// server on loopback (a self-signed certificate the client is told to trust)
    whose every path redirects to the same path on the plain http ``server``."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            key,
            "-out",
            cert,
        ]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", cert)

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", server.base + self.path)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_https_download_redirected_to_plain_http_needs_a_digest(server, tls_redirect, tmp_path):
    make_zip(os.path.join(server.root, "train.zip"), {"train/red/ok.png": PNG})
    url = f"{tls_redirect}/train.zip"
    refused([url], tmp_path / "a", "redirect to http://", "not https:// and no sha256 pins the archive")
    assert server.requests == []
    assert fill_source(str(tmp_path / "b"), [{"url": url, "sha256": server.pinned("train.zip")["sha256"]}])
    assert server.requests == ["/train.zip"]
