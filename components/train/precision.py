"""The training stage's number format (the Keras dtype policy): one rule, one place.

``train.mixed_precision``:

* ``auto``: ``mixed_float16`` on GPU, ``mixed_bfloat16`` on TPU; on CPU ``mixed_bfloat16``
  only where it pays: the backbone's entry says so (``Backbone.cpu_bfloat16``, measured by
  ``benchmarks/bench_cpu_precision.py`` on an Intel CPU with AMX and on an AMD Zen 4 with
  AVX-512 BF16 alone, which split the backbones the same way), the CPU has bfloat16 units
  (AMX, ``amx_bf16``: Intel Sapphire Rapids and later; or AVX-512 BF16, ``avx512_bf16``: AMD
  Zen 4 and later, Intel Cooper Lake) and oneDNN's kernels are on; ``float32`` everywhere else;
* ``true``: mixed precision whatever the device (``mixed_bfloat16`` on a CPU, which runs
  everywhere but is slow without AMX or AVX-512 BF16: the reason says so);
* ``false``: ``float32``.

Mixed precision computes in 16 bits and keeps every variable in float32; the softmax is
float32 (``model.build_head``), and what the stage saves is float32 whatever it trained in
(``model.float32_copy``), so evaluation, the export and serving never see 16-bit math.

:func:`choose` is pure (device, backbone and CPU features are arguments); :func:`cpu_features`
reads this machine's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from components.backbones import get_backbone
from components.config import tri_state

FLOAT32 = "float32"
MIXED_FLOAT16 = "mixed_float16"
MIXED_BFLOAT16 = "mixed_bfloat16"


@dataclass(frozen=True)
class CpuFeatures:
    """What decides whether bfloat16 math is fast on this CPU.

    Attributes:
        amx_bf16: Intel AMX tiles with bfloat16 (``amx_bf16`` in /proc/cpuinfo).
        avx512_bf16: AVX-512 bfloat16 instructions (``avx512_bf16``).
        onednn: TensorFlow's oneDNN CPU kernels are on (``TF_ENABLE_ONEDNN_OPTS`` is not 0);
            without them bfloat16 convolutions fall back to slow reference code.
    """

    amx_bf16: bool = False
    avx512_bf16: bool = False
    onednn: bool = True

    def describe(self) -> str:
        units = [name for name, on in (("AMX", self.amx_bf16), ("AVX-512 BF16", self.avx512_bf16)) if on]
        return (", ".join(units) or "no bfloat16 units") + ("" if self.onednn else ", oneDNN off")


def cpu_features(cpuinfo: str | None = None, environ: Mapping[str, str] | None = None) -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (from ``cpuinfo``, the text of /proc/cpuinfo, when
    given). Where there is no /proc/cpuinfo (macOS, Windows) no unit is assumed."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
            break  # every core lists the same flags
    env = os.environ if environ is None else environ
    return CpuFeatures(
        amx_bf16="amx_bf16" in flags,
        avx512_bf16="avx512_bf16" in flags,
        onednn=env.get("TF_ENABLE_ONEDNN_OPTS", "").strip() not in ("0", "false", "False"),
    )


@dataclass(frozen=True)
class Precision:
    """The chosen policy and, in words, why (logged and in train/summary.json)."""

    policy: str
    reason: str


def choose(setting: str, device: str, backbone: str, cpu: CpuFeatures) -> Precision:
    """The dtype policy for ``train.mixed_precision`` = ``setting`` on ``device`` (``cpu``,
    ``gpu`` or ``tpu``) with ``backbone``, on a CPU with ``cpu``'s features."""
    choice = tri_state(setting)
    if choice == "false":
        return Precision(FLOAT32, "train.mixed_precision: false")
    if device == "gpu":
        return Precision(MIXED_FLOAT16, f"train.mixed_precision: {choice}, on GPU")
    if device == "tpu":
        return Precision(MIXED_BFLOAT16, f"train.mixed_precision: {choice}, on TPU")
    if choice == "true":
        fast = cpu.onednn and (cpu.amx_bf16 or cpu.avx512_bf16)
        note = "" if fast else " (slow here: this CPU has " + cpu.describe() + ")"
        return Precision(MIXED_BFLOAT16, f"train.mixed_precision: true, on CPU{note}")
    if not get_backbone(backbone).cpu_bfloat16:
        return Precision(FLOAT32, f"auto: on CPU, bfloat16 does not pay for {backbone}")
    if not (cpu.amx_bf16 or cpu.avx512_bf16):
        return Precision(FLOAT32, f"auto: on CPU without bfloat16 units ({cpu.describe()})")
    if not cpu.onednn:
        return Precision(FLOAT32, "auto: on CPU with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)")
    return Precision(MIXED_BFLOAT16, f"auto: {backbone} on a CPU with {cpu.describe()}, where bfloat16 pays")
