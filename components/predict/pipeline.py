"""The prediction Beam graph: read and check the images, RunInference, write the predictions.

:func:`build` only wires transforms into a pipeline it is given; the stage module runs it.
The images are read and checked with preprocessing's own transforms and rules (the same dead
letters for the same files), then classified by Beam's ``RunInference``, which batches them
and loads the model once per worker process, through :class:`SavedModelHandler`. The model is
the export's SavedModel called through its ``serving_default`` signature, raw bytes in: the
decoding and resizing are the graph's own, so a prediction here equals TF Serving's answer
for the same file. Nothing collects the results: rows stream to sharded files.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from components.core import storage
from components.preprocess import images, progress, transforms
from components.preprocess.sources import Candidate

STEP_READ = "ReadImages"
STEP_CHECK = "CheckImages"
STEP_INFER = "RunInference"
CLASSIFIED = "images_classified"
CORRUPT_IMAGE = images.CORRUPT_IMAGE
SERVING_DEFAULT = "serving_default"
PREDICTIONS = "predictions"
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything the graph needs, resolved by the stage before the pipeline starts."""

    candidates_uri: str
    output_dir: str  # predictions-*, dead_letter.jsonl and the pipeline's counts
    model_uri: str  # the SavedModel folder every worker loads
    model: dict[str, Any]  # what each row records of its model: name, version, fingerprint
    batch_size: int
    image_threads: int
    model_threads: int
    min_image_size: int
    max_file_bytes: int
    max_decoded_bytes: int
    num_shards: int
    format: str  # jsonl | parquet


def check_image(record: dict[str, Any], min_size: int, max_decoded: int) -> tuple[bool, Any]:
    """``(True, (uri, bytes))`` when the header says the model can take the image, else
    ``(False, dead letter)``: the reasons of preprocessing (``images.inspect``). Pure and
    thread-safe; nothing is decoded here (the model decodes)."""
    try:
        images.inspect(record["data"], min_size, max_decoded)
    except images.BadImage as e:
        return False, transforms.dead_letter(record, STEP_CHECK, e.reason, e.detail)
    return True, (record["uri"], record["data"])


def serve(
    model: Any, batch: Sequence[bytes], inference_args: dict[str, Any], model_id: str | None = None
) -> list[PredictionResult]:
    """The handler's inference function: one ``serving_default`` call for the batch.

    An image the header check let through but the graph cannot decode (a truncated JPEG)
    fails the whole call; the batch is then run an image at a time, and each image that still
    fails gets ``{"error": ...}`` instead of outputs (a ``corrupt_image`` dead letter
    downstream). Only decoding errors (``InvalidArgumentError``) are handled so: anything
    else is a fault of the model or the machine and fails the run.
    """
    import tensorflow as tf

    signature = model.signatures[SERVING_DEFAULT]
    try:
        outputs = signature(images=tf.constant(list(batch), dtype=tf.string))
    except tf.errors.InvalidArgumentError:
        return [_one(signature, data, model_id) for data in batch]
    return _results(outputs, model_id)


def _one(signature: Any, data: bytes, model_id: str | None) -> PredictionResult:
    import tensorflow as tf

    try:
        outputs = signature(images=tf.constant([data], dtype=tf.string))
    except tf.errors.InvalidArgumentError as e:
        return PredictionResult(None, {"error": _reason(e.message or type(e).__name__)}, model_id)
    return _results(outputs, model_id)[0]


def _reason(message: str) -> str:
    """TensorFlow's own words on a failed decode (``jpeg::Uncompress failed. Invalid JPEG
    data or crop window.``), without its graph-execution frame and node names."""
    frame = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Traceback", "File ")
    lines = [line.strip() for line in message.splitlines()]
    said = [line for line in lines if line and not line.startswith(frame)]
    return (said[0] if said else lines[0])[:500]


def _results(outputs: dict[str, Any], model_id: str | None) -> list[PredictionResult]:
    probabilities = outputs["probabilities"].numpy()
    class_ids = outputs["class_ids"].numpy()
    names = outputs["class_names"].numpy()
    return [
        PredictionResult(
            None,
            {
                "class_ids": [int(i) for i in class_ids[row]],
                "class_names": [n.decode("utf-8") for n in names[row]],
                "probabilities": [float(probabilities[row][i]) for i in class_ids[row]],
            },
            model_id,
        )
        for row in range(len(class_ids))
    ]


class SavedModelHandler(ModelHandler):
    """Beam's model handler for the export: loads it with ``tf.saved_model.load`` (it is a
    ``tf.Module`` with signatures, not a Keras model; gs:// through the storage edge) and calls
    :func:`serve`. Batches hold exactly ``batch_size`` images but the last of a bundle. Runs on
    every worker; the model is loaded once per worker process.

    Built on Beam's base ``ModelHandler``, as Beam documents for models of its own kind, rather
    than on ``TFModelHandlerTensor``: that handler would load the model with Keras, and its
    module imports ``tensorflow_hub``, which needs setuptools' ``pkg_resources`` at import and
    fails in an environment whose setuptools cannot resolve the installed distributions (the
    image's, seen in the image test).
    """

    def __init__(self, model_uri: str, batch_size: int, model_threads: int = 0):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_uri = model_uri
        self._model_threads = model_threads

    def load_model(self) -> Any:
        import tensorflow as tf

        from components.evaluate.export import load_saved_model

        # Worker processes on one machine share its GPUs (the local runner's num_workers,
        # Dataflow's SDK processes): without memory growth the first to load takes nearly all
        # of a GPU's memory and the next fails with out-of-memory.
        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # the GPU is in use in this process already: it stays as it is
                pass
        if self._model_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self._model_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._model_threads)
            except RuntimeError:  # the runtime started already in this process: its threads stay
                _LOG.warning("predict.model_threads: TensorFlow already started here; it keeps its threads")
        return load_saved_model(self._model_uri)

    def run_inference(
        self, batch: Sequence[bytes], model: Any, inference_args: dict[str, Any] | None = None
    ) -> list[PredictionResult]:
        return serve(model, batch, inference_args or {}, self._model_uri)

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(data) for data in batch)

    def get_metrics_namespace(self) -> str:
        return STEP_INFER


class _RowFn(beam.DoFn):
    """``(uri, PredictionResult)`` -> a prediction row, or a ``corrupt_image`` dead letter."""

    def __init__(self, model: dict[str, Any]):
        self._model = model

    def process(self, keyed: tuple[str, PredictionResult]):
        uri, result = keyed
        inference = result.inference
        if "error" in inference:
            progress.TALLY.add(progress.DEAD_LETTERS)
            yield beam.pvalue.TaggedOutput(
                transforms.DEAD_LETTER,
                transforms.dead_letter(
                    {"uri": uri},
                    STEP_INFER,
                    CORRUPT_IMAGE,
                    f"the model cannot decode it: {inference['error']}",
                ),
            )
            return
        progress.count(STEP_INFER, CLASSIFIED)
        yield prediction_row(uri, inference, self._model)


def prediction_row(uri: str, inference: dict[str, list], model: dict[str, Any]) -> dict[str, Any]:
    """One output row: the most probable class, the model's top k, and the model's identity."""
    top_k = [
        {"class_name": name, "class_id": class_id, "probability": round(probability, 7)}
        for class_id, name, probability in zip(
            inference["class_ids"], inference["class_names"], inference["probabilities"], strict=True
        )
    ]
    return {**top_k[0], "uri": uri, "top_k": top_k, "model": model}


def build(p: beam.Pipeline, plan: Plan) -> None:
    """Adds the whole prediction graph to ``p``."""
    checked = (
        p
        | "ListImages" >> beam.io.ReadFromText(plan.candidates_uri)
        | "ParseCandidates" >> beam.Map(Candidate.from_json)
        | STEP_READ
        >> transforms.ReadAndCheck(
            functools.partial(storage.read_bytes, max_bytes=plan.max_file_bytes),
            functools.partial(check_image, min_size=plan.min_image_size, max_decoded=plan.max_decoded_bytes),
            plan.image_threads,
            max_file=plan.max_file_bytes,
            step=STEP_CHECK,
        )
    )
    handler = KeyedModelHandler(SavedModelHandler(plan.model_uri, plan.batch_size, plan.model_threads))
    predicted = (
        checked.examples
        | STEP_INFER >> RunInference(handler)
        | "ToRows" >> beam.ParDo(_RowFn(plan.model)).with_outputs(transforms.DEAD_LETTER, main="rows")
    )
    _write_predictions(predicted.rows, plan)
    dead_letters = (
        checked[transforms.DEAD_LETTER],
        predicted[transforms.DEAD_LETTER],
    ) | "FlattenDeadLetters" >> beam.Flatten()
    _write_counts(predicted.rows, dead_letters, plan.output_dir)


def _write_predictions(rows, plan: Plan) -> None:
    prefix = storage.join(plan.output_dir, PREDICTIONS)
    if plan.format == "parquet":
        _ = rows | "WritePredictions" >> beam.io.WriteToParquet(
            prefix, parquet_schema(), file_name_suffix=".parquet", num_shards=plan.num_shards
        )
        return
    _ = (
        rows
        | "ToJson" >> beam.Map(lambda row: json.dumps(row, sort_keys=True, ensure_ascii=False))
        | "WritePredictions"
        >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl", num_shards=plan.num_shards)
    )


def parquet_schema() -> Any:
    """The Parquet schema of a prediction row (the JSON lines' fields and types)."""
    import pyarrow as pa

    entry = [("class_name", pa.string()), ("class_id", pa.int64()), ("probability", pa.float64())]
    model = [("name", pa.string()), ("version", pa.int64()), ("fingerprint", pa.string())]
    return pa.schema(
        [("uri", pa.string()), *entry, ("top_k", pa.list_(pa.struct(entry))), ("model", pa.struct(model))]
    )


def _write_counts(rows, dead_letters, output_dir: str) -> None:
    """dead_letter.jsonl, and the counts the stage folds into summary.json (one JSON line)."""
    _ = (
        dead_letters
        | "DeadLettersToJson" >> beam.Map(lambda row: json.dumps(row, sort_keys=True))
        | "WriteDeadLetters"
        >> beam.io.WriteToText(
            storage.join(output_dir, "dead_letter.jsonl"), shard_name_template="", num_shards=1
        )
    )
    facts = (
        rows | "CountClasses" >> beam.Map(lambda row: (("class", row["class_name"]), 1)),
        dead_letters | "CountDeadLetters" >> beam.Map(lambda d: (("dead_letter", d["reason"]), 1)),
    )
    _ = (
        facts
        | "FlattenFacts" >> beam.Flatten()
        | "CountFacts" >> beam.CombinePerKey(sum)
        | "CollectFacts" >> beam.combiners.ToList()
        | "Summarize" >> beam.Map(_summarize)
        | "WriteCounts"
        >> beam.io.WriteToText(storage.join(output_dir, "counts.json"), shard_name_template="", num_shards=1)
    )


def _summarize(counted: Iterable[tuple[tuple[str, str], int]]) -> str:
    per_class: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for (kind, key), n in counted:
        (per_class if kind == "class" else by_reason)[key] = n
    return json.dumps(
        {
            "predictions": sum(per_class.values()),
            "per_class": dict(sorted(per_class.items())),
            "dead_letter": {"count": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items()))},
        },
        sort_keys=True,
    )
