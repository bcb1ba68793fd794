"""The storage edge, on a local directory and on gs:// served by the in-process emulator."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from components.core import storage
from components.core.storage import FileInfo, join


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty directory: a local path, or a fresh gs://test-bucket/<uuid> prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_prefix")


def _tree(root: str) -> dict[str, bytes]:
    files = {"a.txt": b"abc", "sub/b.bin": bytes(range(5)), "sub/deeper/c.gz": b""}
    for rel, data in files.items():
        storage.write_bytes(join(root, rel), data)
    return files


def _contents(root: str) -> dict[str, bytes]:
    base = root.rstrip("/") + "/"
    return {f.uri[len(base) :]: storage.read_bytes(f.uri) for f in storage.list_files(root)}


def test_join_and_predicates() -> None:
    assert join("gs://b/x/", "/y/", "z") == "gs://b/x/y/z"
    assert join("gs://b", "a//b/", "") == "gs://b/a/b"
    assert join("gs://b/x") == "gs://b/x"
    assert join("/tmp/x/", "a", "/b/") == "/tmp/x/a/b"
    assert join("rel", "a/b") == os.path.join("rel", "a", "b")
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/gs://")
    assert storage.is_absolute("gs://b/x") and storage.is_absolute("/x") and not storage.is_absolute("x/y")


def test_round_trip(root: str) -> None:
    blob = bytes(range(256)) * 3
    storage.write_bytes(join(root, "deep", "er", "blob.gz"), blob)  # .gz: stored as given, not gzipped
    storage.write_text(join(root, "t.txt"), "héllo\nwörld\n")
    assert storage.read_bytes(join(root, "deep/er/blob.gz")) == blob
    assert storage.read_text(join(root, "t.txt")) == "héllo\nwörld\n"
    storage.write_text(join(root, "t.txt"), "")
    assert storage.read_bytes(join(root, "t.txt")) == b""


def test_open_for_write_streams_pieces_into_a_new_file(root: str) -> None:
    target = join(root, "new", "dir", "spill.bin")
    with storage.open_for_write(target) as handle:
        for i in range(3):
            handle.write(bytes([i]) * 100_000)
    assert storage.read_bytes(target) == b"".join(bytes([i]) * 100_000 for i in range(3))


def test_failed_write_leaves_the_old_file(root: str) -> None:
    target = join(root, "f.bin")
    storage.write_bytes(target, b"old")

    def chunks():
        yield b"new, partial"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        storage.write_chunks(target, chunks())
    assert storage.read_bytes(target) == b"old"
    assert [f.uri for f in storage.list_files(root)] == [target]  # no temporary left behind


def test_list_files_recursive_sorted_with_sizes(root: str) -> None:
    _tree(root)
    storage.write_text(root.rstrip("/") + "-sibling/x.txt", "not under root")
    expected = [
        FileInfo(join(root, "a.txt"), 3),
        FileInfo(join(root, "sub/b.bin"), 5),
        FileInfo(join(root, "sub/deeper/c.gz"), 0),
    ]
    assert storage.list_files(root) == expected
    assert storage.list_files(root + "/") == expected
    assert storage.list_files(join(root, "sub")) == expected[1:]
    assert storage.list_files(join(root, "missing")) == []


def test_exists(root: str) -> None:
    assert not storage.exists(root)
    _tree(root)
    assert storage.exists(join(root, "a.txt"))
    assert storage.exists(join(root, "sub/deeper/c.gz"))  # an empty file is still a file
    assert (
        storage.exists(root) and storage.exists(join(root, "sub")) and storage.exists(join(root, "sub") + "/")
    )
    assert not storage.exists(join(root, "su"))  # a name prefix is not a directory
    assert not storage.exists(join(root, "nope.txt"))


def test_read_missing_raises_file_not_found_naming_the_uri(root: str) -> None:
    missing = join(root, "nope", "x.bin")
    with pytest.raises(FileNotFoundError, match="nope/x.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        storage.read_text(missing)


def test_delete_tree(root: str) -> None:
    _tree(root)
    storage.write_text(root.rstrip("/") + "-sibling/x.txt", "kept")
    storage.delete_tree(join(root, "a.txt"))  # one file
    assert [f.uri for f in storage.list_files(root)] == [
        join(root, "sub/b.bin"),
        join(root, "sub/deeper/c.gz"),
    ]
    storage.delete_tree(root)  # everything under it
    assert storage.list_files(root) == [] and not storage.exists(root)
    storage.delete_tree(root)  # missing is fine
    storage.delete_tree(join(root, "never", "was.txt"))
    assert storage.read_text(root.rstrip("/") + "-sibling/x.txt") == "kept"


def test_copy_tree(root: str) -> None:
    files = _tree(join(root, "src"))
    storage.write_text(join(root, "dst", "a.txt"), "to be overwritten")
    assert storage.copy_tree(join(root, "src"), join(root, "dst")) == 3
    assert _contents(join(root, "dst")) == files
    assert _contents(join(root, "src")) == files
    assert storage.copy_tree(join(root, "empty"), join(root, "dst2")) == 0
    assert not storage.exists(join(root, "dst2"))


def test_move_tree(root: str) -> None:
    files = _tree(join(root, "src"))
    assert storage.move_tree(join(root, "src"), join(root, "dst", "nested")) == 3
    assert _contents(join(root, "dst", "nested")) == files
    assert storage.list_files(join(root, "src")) == [] and not storage.exists(join(root, "src"))
    # Into a destination that already holds files: merged, no rename possible.
    _tree(join(root, "src2"))
    storage.write_text(join(root, "dst", "nested", "extra.txt"), "x")
    assert storage.move_tree(join(root, "src2"), join(root, "dst", "nested")) == 3
    assert _contents(join(root, "dst", "nested")) == {**files, "extra.txt": b"x"}
    assert not storage.exists(join(root, "src2"))


def test_move_tree_refuses_to_move_into_itself(root: str) -> None:
    _tree(join(root, "src"))
    for dst in (join(root, "src"), join(root, "src", "inner")):
        with pytest.raises(ValueError, match="into itself"):
            storage.move_tree(join(root, "src"), dst)
    assert len(storage.list_files(join(root, "src"))) == 3


@pytest.mark.gcs
def test_copy_and_move_across_local_and_gcs(tmp_path, gcs_prefix: str) -> None:
    local = str(tmp_path / "local")
    files = _tree(local)
    assert storage.copy_tree(local, join(gcs_prefix, "up")) == 3
    assert _contents(join(gcs_prefix, "up")) == files
    assert storage.move_tree(join(gcs_prefix, "up"), str(tmp_path / "down")) == 3
    assert _contents(str(tmp_path / "down")) == files
    assert not storage.exists(join(gcs_prefix, "up"))


@pytest.mark.gcs
def test_gcs_folder_placeholders_are_not_files(gcs_emulator, gcs_prefix: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    bucket = gcs.Client(project="test-project", credentials=AnonymousCredentials()).bucket(
        gcs_emulator.bucket
    )
    name = gcs_prefix[len(f"gs://{gcs_emulator.bucket}/") :]
    bucket.blob(f"{name}/folder/").upload_from_string(b"")  # what the console's "create folder" makes
    storage.write_text(join(gcs_prefix, "folder", "x.txt"), "x")
    assert storage.list_files(gcs_prefix) == [FileInfo(join(gcs_prefix, "folder/x.txt"), 1)]
    storage.delete_tree(join(gcs_prefix, "folder", "x.txt"))
    assert storage.list_files(gcs_prefix) == []
    assert not storage.exists(join(gcs_prefix, "folder"))  # only the placeholder is left
    storage.delete_tree(gcs_prefix)  # takes the placeholder too
    assert list(bucket.list_blobs(prefix=name + "/")) == []


@pytest.mark.gcs
def test_beam_pipeline_io_on_gcs(gcs_prefix: str) -> None:
    """Beam's own sinks, sources and MatchFiles work against the emulator, on gs://."""
    records = [f"record-{i}".encode() for i in range(20)]
    lines = [f"line {i}" for i in range(20)]
    with beam.Pipeline(options=PipelineOptions(runner="DirectRunner")) as p:
        _ = (
            p
            | "Records" >> beam.Create(records)
            | beam.io.WriteToTFRecord(
                join(gcs_prefix, "tfr", "part"), file_name_suffix=".tfrecord", num_shards=2
            )
        )
        _ = (
            p
            | "Lines" >> beam.Create(lines)
            | beam.io.WriteToText(join(gcs_prefix, "txt", "part"), file_name_suffix=".txt", num_shards=2)
        )
    written = storage.list_files(gcs_prefix)
    assert [f.uri[len(gcs_prefix) + 1 :] for f in written] == [
        "tfr/part-00000-of-00002.tfrecord",
        "tfr/part-00001-of-00002.tfrecord",
        "txt/part-00000-of-00002.txt",
        "txt/part-00001-of-00002.txt",
    ]  # and Beam's temporary files are gone

    with beam.Pipeline(options=PipelineOptions(runner="DirectRunner")) as p:
        read_records = p | beam.io.ReadFromTFRecord(join(gcs_prefix, "tfr", "part-*"))
        assert_that(read_records, equal_to(records), label="CheckRecords")
        read_lines = p | beam.io.ReadFromText(join(gcs_prefix, "txt", "*.txt"))
        assert_that(read_lines, equal_to(lines), label="CheckLines")
        matched = (
            p | fileio.MatchFiles(join(gcs_prefix, "**")) | beam.Map(lambda m: (m.path, m.size_in_bytes))
        )
        assert_that(matched, equal_to([(f.uri, f.size) for f in written]), label="CheckMatch")


def test_iter_chunks_streams_a_file(root: str) -> None:
    data = os.urandom(3 * 2**20 + 5)
    storage.write_bytes(join(root, "big.bin"), data)
    assert b"".join(storage.iter_chunks(join(root, "big.bin"))) == data
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        list(storage.iter_chunks(join(root, "missing.bin")))


@pytest.mark.gcs
def test_local_copy_of_a_gcs_file_lies_in_a_scratch_folder_that_goes(gcs_prefix: str) -> None:
    uri = join(gcs_prefix, "model.keras")
    storage.write_bytes(uri, b"weights")
    with storage.local_copy(uri) as path:
        folder = os.path.dirname(path)
        assert os.path.basename(folder).startswith("finetune-copy-")  # swept if this process is killed
        assert path.endswith(".keras") and open(path, "rb").read() == b"weights"
    assert not os.path.exists(folder)
    with storage.local_copy(__file__) as path:  # a local path is its own copy
        assert path == __file__
