"""Named compression presets.

=============  =================================================================================
``none``       no compression: replies are left untouched (plain float arrays).
``fedzip``     FedZip (Malekijoo et al. 2021): per-layer top-z (2%), k-means codebook with 3
               clusters per layer, entropy-coded cluster ids and index gaps; error feedback.
               Tensors with fewer than 1000 elements (biases, the digits CNN's first conv and
               output layer) skip top-z and send every coordinate as a 3-cluster code
               (``dense_below=1000``; DGC's reference code likewise sends 1-D tensors dense):
               top-2% of a 640-weight output layer keeps 13 values, its 640 codes cost ~130
               bytes. On the digits CNN (Flower FedAvg, 4 clients, 5 seeds) this is what
               brings FedZip within a point of uncompressed at >100x (``baselines/fedzip``);
               ``"fedzip:dense_below=0"`` is plain per-layer top-z everywhere and
               ``"fedzip:density=0.01"`` FedZip's own 1%.
``dgc``        Deep Gradient Compression as in the paper (Lin et al., ICLR 2018): top-k with
               local accumulation at 0.1 % density (99.9 % sparsity), exact float values,
               entropy-coded index gaps; momentum correction ``m = 0.9`` with momentum
               factor masking; the warm-up 75 %, 93.75 %, 98.4375 %, 99.6 % sparsity over the
               client's first 4 replies, then 99.9 % (``DGC_WARMUP``); local gradient
               clipping at ``clip_norm`` (off until set: the threshold is the model's,
               ``N^{-1/2}`` times the global one). See
               :mod:`flwr_ext.compression.feedback` for the equations and how a round's
               delta stands in for the paper's per-iteration gradient. The pipeline this
               preset was before (top-k 0.5 %, error feedback, no momentum, no warm-up) is
               ``"dgc:density=0.005,momentum=0,warmup=none"``.
``qsgd-8bit``  QSGD (Alistarh et al., NeurIPS 2017) with ``s = 127`` levels (signed 8-bit
               symbols), buckets of 512 values, ANS-coded levels. Dense and unbiased; no error
               feedback needed.
``sparse-lora`` top-k (10%) on the LoRA ``lora_A`` / ``lora_B`` deltas only (as in CELLM), exact
               values, error feedback; other tensors are sent exactly.
=============  =================================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .codec import PipelineConfig
from .errors import ConfigError
from .feedback import DGCConfig

#: DGC's warm-up densities (Lin et al. 2018, Sec. 3.3: sparsity 75 %, 93.75 %, 98.4375 %,
#: 99.6 %; the 5th step on is the final 99.9 %, i.e. the preset's ``density=0.001``).
DGC_WARMUP = (0.25, 0.0625, 0.015625, 0.004)

PRESETS: dict[str, PipelineConfig | None] = {
    "none": None,
    "fedzip": PipelineConfig(
        name="fedzip",
        sparsify="topk",
        density=0.02,
        quantize="kmeans",
        clusters=3,
        error_feedback=True,
        dense_below=1000,
    ),
    "dgc": DGCConfig(
        name="dgc",
        sparsify="topk",
        density=0.001,
        quantize="none",
        error_feedback=True,
        momentum=0.9,
        momentum_masking=True,
        warmup=DGC_WARMUP,
        clip_norm=0.0,
    ),
    "qsgd-8bit": PipelineConfig(
        name="qsgd-8bit", quantize="qsgd", levels=127, bucket=512, error_feedback=False
    ),
    "sparse-lora": PipelineConfig(
        name="sparse-lora",
        sparsify="topk",
        density=0.1,
        quantize="none",
        error_feedback=True,
        include=("lora_A", "lora_B"),
    ),
}


def get_preset(name: str, **overrides: Any) -> PipelineConfig | None:
    """Return preset ``name`` with fields replaced by ``overrides`` (``None`` for ``"none"``).

    Examples
    --------
    >>> get_preset("fedzip", density=0.005).density
    0.005
    """
    if ":" in name:
        name, extra = parse_spec(name)
        overrides = {**extra, **overrides}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[name]
    if base is None:
        if overrides:
            raise ConfigError("preset 'none' takes no options")
        return None
    if "warmup" in overrides:
        overrides = {**overrides, "warmup": _schedule(overrides["warmup"])}
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _schedule(value: Any) -> tuple[float, ...]:
    """Warm-up schedule from an override: a tuple, a number, or ``none`` / empty (no warm-up)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, tuple | list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return tuple(float(v) for v in value)
    raise ConfigError(f"warmup must be densities separated by '/', or 'none'; got {value!r}")


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "/" in text:  # tuples, e.g. warmup=0.04/0.02/0.01 or include=lora_A/lora_B
        return tuple(_value(t) for t in text.split("/") if t)
    return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` (a run-config string) into a preset and overrides.

    Values are parsed as bool, int, float, ``/``-separated tuples, or left as strings.

    Examples
    --------
    >>> parse_spec("fedzip:density=0.01,clusters=4")
    ('fedzip', {'density': 0.01, 'clusters': 4})
    >>> parse_spec("dgc:warmup=0.04/0.02")
    ('dgc', {'warmup': (0.04, 0.02)})
    """
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"bad option {item!r} in compression spec {spec!r}")
        overrides[key.strip()] = _value(val)
    return name.strip(), overrides
