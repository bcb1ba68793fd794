"""The preprocessing Beam graph: read, decode, split, dedupe, analyse, write.

:func:`build` only wires transforms into a pipeline it is given; the stage module runs it.
All file access goes through Beam's own I/O (``ReadFromText``, ``WriteToText``) and
``components.core.storage`` (images, spill files, TFRecord shards), so the same graph runs on the
local runner, Dataflow, Flink or Spark.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from components.core import scratch, storage
from components.preprocess import analysis, progress, schema, spill, transforms
from components.preprocess.sources import Candidate
from components.preprocess.splits import SPLITS

LEAKAGE_EXAMPLES = 10
STEP_WRITE = "WriteTFRecords"


@dataclass(frozen=True)
class Plan:
    """Everything the graph needs, resolved by the stage before the pipeline starts."""

    candidates_uri: str
    output_dir: str  # TFRecords, dead letters, duplicates and the pipeline's counts
    spill_dir: str  # scratch: the decoded images, per bundle and shard, until their shard is written
    transform_fn_dir: str  # where WriteTransformFn writes (TF file system)
    image_size: int
    min_image_size: int
    jpeg_quality: int
    max_file_bytes: int  # an input over this is a dead letter, never read past it
    max_decoded_bytes: int  # an image whose decoded pixels would take more is a dead letter
    image_threads: int  # threads reading and decoding images per Beam worker; 0: one per core
    shards: dict[str, int]  # TFRecord files per split (``shards.plan_shards``)
    sort_bytes: int  # memory a shard writer may hold to order its records (``spill.Sorter``)
    split_fractions: tuple[float, float, float]
    source_has_eval: bool


def _raw(example: dict[str, Any]) -> dict[str, Any]:
    return {k: example[k] for k in analysis.RAW_FEATURE_SPEC}


def build(p: beam.Pipeline, plan: Plan) -> None:
    """Adds the whole preprocessing graph to ``p``; must run inside a ``tft_beam.Context``."""
    decoded = (
        p
        | "ListImages" >> beam.io.ReadFromText(plan.candidates_uri)
        | "ParseCandidates" >> beam.Map(Candidate.from_json)
        | "ReadImages"
        >> transforms.ReadAndDecode(
            functools.partial(storage.read_bytes, max_bytes=plan.max_file_bytes),
            plan.image_size,
            plan.min_image_size,
            plan.jpeg_quality,
            plan.image_threads,
            max_file=plan.max_file_bytes,
            max_decoded=plan.max_decoded_bytes,
        )
    )
    train_f, eval_f, test_f = plan.split_fractions
    examples = decoded.examples | "AssignSplits" >> transforms.AssignSplits(
        train_f, eval_f, test_f, plan.source_has_eval
    )
    deduped = examples | "Deduplicate" >> transforms.Deduplicate()
    vocabulary = _analyse(deduped.examples, plan.transform_fn_dir)
    dropped = beam.pvalue.AsList(deduped.duplicate | "DroppedIds" >> beam.Map(lambda d: d["id"]))
    written, empty = _write_records(examples, plan, dropped, vocabulary)
    dead_letters = (
        decoded[transforms.DEAD_LETTER],
        written[transforms.DEAD_LETTER],
    ) | "FlattenDeadLetters" >> beam.Flatten()
    shard_facts = (written.records, empty) | "FlattenShardFacts" >> beam.Flatten()
    _write_reports(shard_facts, dead_letters, deduped.duplicate, plan.output_dir)


def _analyse(kept, transform_fn_dir: str) -> beam.pvalue.AsSideInput:
    """tf.Transform over the kept train examples; writes the graph and returns the label
    vocabulary (class-id order) as a side input."""
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec(analysis.RAW_FEATURE_SPEC)
    )
    analysed = (
        kept | "TrainOnly" >> beam.Filter(lambda ex: ex["split"] == "train") | "ToRaw" >> beam.Map(_raw)
    )
    transform_fn = (analysed, metadata) | "AnalyzeDataset" >> tft_beam.AnalyzeDataset(
        analysis.preprocessing_fn
    )
    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_fn_dir)
    saved_model_dir, _ = transform_fn
    return beam.pvalue.AsSingleton(saved_model_dir | "ReadVocabulary" >> beam.Map(analysis.read_vocabulary))


def _write_records(examples, plan: Plan, dropped, vocabulary):
    """Writes each split's TFRecord shards. Returns a ``DoOutputsTuple``: ``records``
    (``(("record", split, label), count)`` per shard and class, and each shard's
    ``(("shard", name, sha256), bytes)``), ``dead_letter`` and ``written`` (the shards that had
    images); and the empty shards' ``(("shard", name, sha256), 0)``.

    The image bytes never cross a shuffle: as they come from decoding, the examples are
    appended to spill files (one per bundle, split and shard), and only the files' names are
    grouped by (split, shard). The writer streams them back and gives the examples their class
    ids, once the vocabulary and the dropped duplicates are known (side inputs). Encoded
    images are tens of KB, and moving them between stages through Beam is most of its cost
    per image (see :mod:`components.preprocess.spill`).

    Deterministic: a record's shard comes from its content hash and each shard is written in
    hash order, so the same images always give byte-identical files on any runner (and the
    trainer, seeded, the same model). A writer orders its shard within ``plan.sort_bytes``
    of memory, in sorted runs on local disk beyond it (``spill.Sorter``): its memory does
    not grow with the shard.
    """
    written = (
        examples
        | "SpillByShard" >> beam.ParDo(_SpillFn(plan.spill_dir, plan.shards, SPILL_OPEN_BYTES))
        | "GroupByShard" >> beam.GroupByKey()
        | STEP_WRITE
        >> beam.ParDo(
            _WriteShardFn(plan.output_dir, plan.shards, plan.sort_bytes), dropped, vocabulary
        ).with_outputs(transforms.DEAD_LETTER, _WRITTEN, main="records")
    )
    # Every shard exists, an empty file when no image hashes to it (as Beam's own
    # fixed-shard writes do), so readers always find every split's files. Written apart, once
    # the others are: a Flatten into the grouping above would copy every image once more.
    # The written keys are a dict side input: built once, not once per shard key.
    written_keys = beam.pvalue.AsDict(
        written[_WRITTEN] | "WrittenKeys" >> beam.Map(lambda key: (tuple(key), True))
    )
    empty = (
        examples.pipeline
        | "EveryShard" >> beam.Create([(s, i) for s in SPLITS for i in range(plan.shards[s])])
        | "WriteEmptyShards" >> beam.FlatMap(_write_empty_shard, plan.output_dir, plan.shards, written_keys)
    )
    return written, empty


_WRITTEN = "written"  # the (split, shard) keys WriteTFRecords wrote


def _shard_uri(output_dir: str, split: str, index: int, num_shards: int) -> str:
    return storage.join(output_dir, split, schema.shard_name(index, num_shards))


def _write_empty_shard(key: tuple[str, int], output_dir: str, shards: dict[str, int], written: dict):
    if tuple(key) not in written:
        digest = _Digest()
        storage.write_chunks(_shard_uri(output_dir, *key, shards[key[0]]), digest.through(iter(())))
        yield digest.fact(*key, shards[key[0]])


# Bytes a bundle writes to its open spill files before it closes them and opens new ones.
# A gs:// writer holds up to 16 MiB until it uploads, and a bundle may have a file open for
# each split and shard: this bounds what a worker holds whatever the bundle and shard count.
SPILL_OPEN_BYTES = 256 * 1024 * 1024


class _SpillFn(beam.DoFn):
    """Appends each example to its bundle's spill file for the example's (split, shard); closes
    the files at the end of the bundle (or once they hold ``max_open_bytes``) and emits
    ``((split, shard), uri)`` for each.

    A file's name is only handed on once it is closed, and each bundle attempt writes new
    files: a failed or retried bundle's files are never read, and go with the scratch space.
    """

    def __init__(self, spill_dir: str, shards: dict[str, int], max_open_bytes: int):
        self._dir = spill_dir
        self._shards = shards
        self._max_open_bytes = max_open_bytes
        self._files: dict[tuple[str, int], tuple[str, Any]] = {}  # key -> (uri, open handle)
        self._open_bytes = 0

    def start_bundle(self):
        self._close()  # a failed bundle's files, if any

    def process(self, example: dict[str, Any]):
        key = (example["split"], schema.shard_of(example["sha256"], self._shards[example["split"]]))
        if key not in self._files:
            uri = storage.join(self._dir, f"{uuid.uuid4().hex}-{key[0]}-{key[1]:05d}.spill")
            self._files[key] = (uri, storage.open_for_write(uri))
        entry = spill.pack(example)
        self._files[key][1].write(entry)
        self._open_bytes += len(entry)
        if self._open_bytes >= self._max_open_bytes:
            yield from self._close()

    def finish_bundle(self):
        # A file gathers a bundle's examples whatever their window: this stage is batch-only,
        # in the global window, like the rest of the graph.
        for key, uri in self._close():
            yield beam.transforms.window.GlobalWindows.windowed_value((key, uri))

    def teardown(self):
        self._close()

    def _close(self) -> list[tuple[tuple[str, int], str]]:
        files, self._files, self._open_bytes = self._files, {}, 0
        for _, handle in files.values():
            handle.close()
        return [(key, uri) for key, (uri, _) in files.items()]


class _WriteShardFn(beam.DoFn):
    """Writes one shard of one split; on every worker.

    Streams the shard's examples from its spill files and gives each its class id from the
    vocabulary. Skips the copies Deduplicate dropped (here, where the image bytes are). An
    eval or test image whose label no train image has becomes a dead letter: the model could
    never predict it. The records are put in content-hash order within ``sort_bytes`` of
    memory (``spill.Sorter``: sorted runs in a local scratch folder beyond it) and the shard
    is written atomically, streamed, through the storage edge.
    """

    def __init__(self, output_dir: str, shards: dict[str, int], sort_bytes: int):
        self._output_dir = output_dir
        self._shards = shards
        self._sort_bytes = sort_bytes
        self._ids: dict[str, int] = {}
        self._dropped: set[int] = set()
        self._sources: tuple[Any, Any] = (None, None)

    def process(self, shard: tuple[tuple[str, int], Any], dropped: list[int], vocabulary: list[str]):
        if self._sources[0] is not dropped or self._sources[1] is not vocabulary:
            self._dropped = set(dropped)
            self._ids = {name: i for i, name in enumerate(vocabulary)}
            self._sources = (dropped, vocabulary)
        (split, index), spill_uris = shard
        counts: Counter = Counter()
        with spill.Sorter(self._sort_bytes, functools.partial(scratch.mkdtemp, "shard-sort")) as sorter:
            for example in _read_spills(spill_uris):
                if example["id"] in self._dropped:
                    continue
                label_id = self._ids.get(example["label"], analysis.UNKNOWN_LABEL)
                if label_id == analysis.UNKNOWN_LABEL:
                    yield beam.pvalue.TaggedOutput(transforms.DEAD_LETTER, _unknown_label(example, split))
                    continue
                record = schema.encode_example(example["image"], label_id, example["label"], example["uri"])
                sorter.add(example["sha256"].encode("ascii"), record)
                counts[example["label"]] += 1
            num_shards = self._shards[split]
            digest = _Digest()
            framed = (schema.frame_record(record) for _, record in sorter.sorted())
            uri = _shard_uri(self._output_dir, split, index, num_shards)
            storage.write_chunks(uri, digest.through(framed))
        progress.count(STEP_WRITE, progress.RECORDS, sum(counts.values()))
        progress.count(STEP_WRITE, progress.SHARDS)
        yield beam.pvalue.TaggedOutput(_WRITTEN, (split, index))
        yield digest.fact(split, index, num_shards)
        for label, count in sorted(counts.items()):
            yield ("record", split, label), count


def _unknown_label(example: dict[str, Any], split: str) -> dict[str, Any]:
    return transforms.dead_letter(
        {**example, "split": split},
        "ApplyVocabulary",
        "label_not_in_train",
        f"label '{example['label']}' appears in {split} but in no train image",
    )


class _Digest:
    """SHA-256 and size of the bytes a shard writer streams, for summary.json's ``shards``:
    what later stages key their resumes on and ``finetune run`` checks before a skip."""

    def __init__(self):
        self._sha256, self._bytes = hashlib.sha256(), 0

    def through(self, chunks):
        for chunk in chunks:
            self._sha256.update(chunk)
            self._bytes += len(chunk)
            yield chunk

    def fact(self, split: str, index: int, num_shards: int) -> tuple[tuple[str, str, str], int]:
        """``(("shard", "<split>/<file>", sha256), bytes)``: summed per key, so one per shard."""
        name = f"{split}/{schema.shard_name(index, num_shards)}"
        return ("shard", name, self._sha256.hexdigest()), self._bytes


def _read_spills(uris):
    for uri in sorted(uris):
        yield from spill.unpack_stream(storage.iter_chunks(uri))


def _write_reports(records, dead_letters, duplicates, output_dir: str) -> None:
    """dead_letter.jsonl, duplicates.jsonl, and the counts the stage folds into summary.json."""
    _write_jsonl(dead_letters, storage.join(output_dir, "dead_letter.jsonl"), "WriteDeadLetters")
    _write_jsonl(duplicates, storage.join(output_dir, "duplicates.jsonl"), "WriteDuplicates")
    facts = (  # (fact, count)
        records,
        dead_letters | "CountDeadLetters" >> beam.Map(lambda d: (("dead_letter", d["reason"]), 1)),
        duplicates | "CountDuplicates" >> beam.FlatMap(lambda d: ((fact, 1) for fact in _duplicate_facts(d))),
    )
    leakage = (
        duplicates
        | "CrossSplit" >> beam.Filter(lambda d: d["cross_split"])
        | "LeakageExamples" >> beam.combiners.Sample.FixedSizeGlobally(LEAKAGE_EXAMPLES)
    )
    _ = (
        facts
        | "FlattenFacts" >> beam.Flatten()
        | "CountFacts" >> beam.CombinePerKey(sum)
        | "CollectFacts" >> beam.combiners.ToList()
        | "Summarize" >> beam.Map(_summarize, leakage=beam.pvalue.AsSingleton(leakage))
        | "WriteCounts"
        >> beam.io.WriteToText(storage.join(output_dir, "counts.json"), shard_name_template="", num_shards=1)
    )


def _duplicate_facts(dup: dict[str, Any]):
    yield ("duplicate", "count")
    if dup["cross_split"]:
        yield ("duplicate", "cross_split")
    if dup["conflicting_label"]:
        yield ("duplicate", "conflicting_label")


def _write_jsonl(pcoll, path: str, name: str) -> None:
    _ = (
        pcoll
        | f"{name}ToJson" >> beam.Map(lambda row: json.dumps(row, sort_keys=True))
        | name >> beam.io.WriteToText(path, shard_name_template="", num_shards=1)
    )


def _summarize(counted: list, leakage: list) -> str:
    """Folds the counted facts into the pipeline's part of summary.json (one JSON line)."""
    records = {s: 0 for s in SPLITS}
    per_class: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    by_reason: dict[str, int] = {}
    duplicates = {"count": 0, "cross_split": 0, "conflicting_label": 0}
    shards: dict[str, dict[str, Any]] = {}
    for fact, n in counted:
        if fact[0] == "record":
            records[fact[1]] += n
            per_class[fact[1]][fact[2]] = n
        elif fact[0] == "shard":
            shards[fact[1]] = {"bytes": n, "sha256": fact[2]}
        elif fact[0] == "dead_letter":
            by_reason[fact[1]] = n
        else:
            duplicates[fact[1]] = n
    return json.dumps(
        {
            "records": records,
            "per_class": {s: dict(sorted(c.items())) for s, c in per_class.items()},
            "dead_letter": {"count": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items()))},
            "duplicates": duplicates,
            "shards": dict(sorted(shards.items())),
            "leakage": {
                "count": duplicates["cross_split"],
                "examples": sorted(
                    ({k: d[k] for k in ("uri", "split", "duplicate_of", "kept_split")} for d in leakage),
                    key=lambda d: d["uri"],
                ),
            },
        },
        sort_keys=True,
    )
