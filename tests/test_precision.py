"""The training stage's number format: the policy as a pure function of the setting, the
device, the backbone and the CPU's units; a real run under bfloat16 on this CPU, whose saved
models, export and TFLite model are float32."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from components.backbones import BACKBONES
from components.config import load_config
from components.evaluate import stage as evaluate_stage
from components.train import model as train_model
from components.train import stage as train_stage
from components.train.precision import (
    FLOAT32,
    MIXED_BFLOAT16,
    MIXED_FLOAT16,
    CpuFeatures,
    choose,
    cpu_features,
)
from tests.train_helpers import copy_prepared, train_config

AMX = CpuFeatures(amx_bf16=True, avx512_bf16=True, onednn=True)
AVX512_ONLY = CpuFeatures(amx_bf16=False, avx512_bf16=True, onednn=True)
PLAIN = CpuFeatures(amx_bf16=False, avx512_bf16=False, onednn=True)
AMX_NO_ONEDNN = CpuFeatures(amx_bf16=True, avx512_bf16=True, onednn=False)
PAYS = [name for name, b in BACKBONES.items() if b.cpu_bfloat16]
DOES_NOT_PAY = [name for name, b in BACKBONES.items() if not b.cpu_bfloat16]


def test_the_table_marks_some_backbones_and_not_others():
    # The measurement (benchmarks/bench_cpu_precision.py, docs/performance.md): the dense
    # convolution backbones gain on AMX and on AVX-512 BF16, the depthwise ones lose.
    assert {"resnet50", "vgg16"} <= set(PAYS)
    assert {"mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"} <= set(DOES_NOT_PAY)


def test_the_docs_backbone_table_says_what_the_table_does():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "stages.md"), encoding="utf-8").read()
    said = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[3] in ("bfloat16", "float32"):
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                said[name] = cells[3] == "bfloat16"
    assert said == {name: b.cpu_bfloat16 for name, b in BACKBONES.items()}


@pytest.mark.parametrize(
    "setting, device, backbone, cpu, policy, reason",
    [
        ("auto", "gpu", "mobilenet_v2", PLAIN, MIXED_FLOAT16, "on GPU"),
        ("auto", "tpu", "resnet50", PLAIN, MIXED_BFLOAT16, "on TPU"),
        ("true", "gpu", "resnet50", AMX, MIXED_FLOAT16, "true, on GPU"),
        ("false", "gpu", "resnet50", AMX, FLOAT32, "false"),
        ("false", "cpu", "resnet50", AMX, FLOAT32, "false"),
        ("off", "tpu", "resnet50", AMX, FLOAT32, "false"),
        ("auto", "cpu", "resnet50", AMX, MIXED_BFLOAT16, "resnet50 on a CPU with AMX, AVX-512 BF16"),
        ("auto", "cpu", "vgg16", AMX, MIXED_BFLOAT16, "vgg16 on a CPU with AMX"),
        ("auto", "cpu", "vgg16", AVX512_ONLY, MIXED_BFLOAT16, "vgg16 on a CPU with AVX-512 BF16,"),
        ("auto", "cpu", "mobilenet_v2", AMX, FLOAT32, "does not pay for mobilenet_v2"),
        ("auto", "cpu", "efficientnet_b0", AMX, FLOAT32, "does not pay for efficientnet_b0"),
        ("auto", "cpu", "resnet50", AVX512_ONLY, MIXED_BFLOAT16, "resnet50 on a CPU with AVX-512 BF16"),
        ("auto", "cpu", "mobilenet_v2", AVX512_ONLY, FLOAT32, "does not pay for mobilenet_v2"),
        ("auto", "cpu", "resnet50", PLAIN, FLOAT32, "without bfloat16 units (no bfloat16 units)"),
        ("auto", "cpu", "resnet50", AMX_NO_ONEDNN, FLOAT32, "oneDNN off"),
        ("true", "cpu", "mobilenet_v2", AMX, MIXED_BFLOAT16, "true, on CPU"),
        ("on", "cpu", "resnet50", PLAIN, MIXED_BFLOAT16, "slow here: this CPU has no bfloat16 units"),
    ],
)
def test_the_policy_is_a_function_of_setting_device_backbone_and_cpu(
    setting, device, backbone, cpu, policy, reason
):
    chosen = choose(setting, device, backbone, cpu)
    assert chosen.policy == policy
    assert reason in chosen.reason


@pytest.mark.parametrize("name", PAYS)
def test_every_backbone_the_table_marks_gets_bfloat16_on_bfloat16_units_only(name):
    for cpu in (AMX, AVX512_ONLY):
        assert choose("auto", "cpu", name, cpu).policy == MIXED_BFLOAT16
    for cpu in (PLAIN, AMX_NO_ONEDNN):
        assert choose("auto", "cpu", name, cpu).policy == FLOAT32


@pytest.mark.parametrize(
    "written, backbone, policy",
    [("true", "mobilenet_v2", MIXED_BFLOAT16), ("True", "mobilenet_v2", MIXED_BFLOAT16),
     ("off", "resnet50", FLOAT32), ("auto", "resnet50", MIXED_BFLOAT16), ("auto", "mobilenet_v2", FLOAT32)],
)  # fmt: skip
def test_the_setting_is_read_as_the_configuration_holds_it(written, backbone, policy):
    overrides = [f"model.backbone={backbone}", f"train.mixed_precision={written}"]
    config = load_config(None, ["data.source=/d", "run_dir=/r", *overrides])
    assert choose(config.train.mixed_precision, "cpu", config.model.backbone, AMX).policy == policy


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bogomips\t: 4200.00

processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_features_come_from_cpuinfo_flags_and_the_onednn_switch():
    assert cpu_features(CPUINFO, {}) == AMX
    assert cpu_features(CPUINFO, {"TF_ENABLE_ONEDNN_OPTS": "0"}) == AMX_NO_ONEDNN
    assert cpu_features(CPUINFO.replace(" amx_bf16", ""), {"TF_ENABLE_ONEDNN_OPTS": "1"}) == AVX512_ONLY
    assert cpu_features("flags : fpu sse2 avx2\n", {}) == PLAIN
    assert cpu_features("", {}) == PLAIN  # no /proc/cpuinfo: no unit assumed
    assert AMX.describe() == "AMX, AVX-512 BF16" and PLAIN.describe() == "no bfloat16 units"


def _dtypes(layer) -> set[str]:
    """The compute dtypes of ``layer`` and every layer inside it."""
    found = {layer.compute_dtype}
    for inner in getattr(layer, "layers", []):
        found |= _dtypes(inner)
    return found


def _graph_dtypes(graph_def) -> set[int]:
    """Every dtype a node of ``graph_def`` (its functions included) names."""
    found = set()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    for node in nodes:
        for value in node.attr.values():
            if value.type:
                found.add(value.type)
            found.update(value.list.type)
    return found


def test_a_bfloat16_run_on_cpu_trains_finite_and_saves_exports_and_serves_float32(tiny_trained, tmp_path):
    run_dir = copy_prepared(tiny_trained, str(tmp_path / "run"))
    config = train_config(run_dir, "train.mixed_precision=true", "evaluate.bootstrap_samples=200")
    summary = train_stage.run(config)
    assert summary["precision_policy"] == MIXED_BFLOAT16
    assert tf_keras.mixed_precision.global_policy().name == FLOAT32  # restored for evaluate
    assert summary["precision_reason"].startswith("train.mixed_precision: true, on CPU")
    out = os.path.join(run_dir, "train")
    for phase in ("baseline", "candidate"):
        history = json.loads(open(os.path.join(out, phase, "history.json")).read())
        losses = history["loss"] + history["val_loss"]
        assert losses and all(np.isfinite(losses)), (phase, history)
        assert np.isfinite(summary[phase]["eval"]["loss"])
        saved = train_model.load_model(os.path.join(out, phase, "model.keras"))
        assert _dtypes(saved) == {"float32"}, phase  # trained in bfloat16, saved in float32

    # Interrupted after the baseline: the float32 baseline loads into the bfloat16 model.
    os.remove(os.path.join(out, "summary.json"))
    os.remove(os.path.join(out, "candidate", "result.json"))
    resumed = train_stage.run(config)
    assert resumed["baseline"] == summary["baseline"] and resumed["precision_policy"] == MIXED_BFLOAT16
    assert np.isfinite(resumed["candidate"]["eval"]["loss"])

    verdict = evaluate_stage.run(
        train_config(
            run_dir, "evaluate.bootstrap_samples=200", "gate.min_improvement=-1", "export.tflite=true"
        )
    )
    assert verdict["blessed"] is True
    assert verdict["export"]["max_difference_from_trained"] < 1e-5
    served = tf.saved_model.load(os.path.join(run_dir, "export", "saved_model"))
    graph = served.signatures["serving_default"].graph.as_graph_def()
    dtypes = _graph_dtypes(graph)
    assert tf.float32.as_datatype_enum in dtypes
    assert tf.bfloat16.as_datatype_enum not in dtypes and tf.float16.as_datatype_enum not in dtypes
    with warnings.catch_warnings():  # as export.TFLiteClassifier: TF 2.21's deprecation notice
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_path=os.path.join(run_dir, "export", "model.tflite"))
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.float32 in kinds and not kinds & {np.float16, tf.bfloat16.as_numpy_dtype}
