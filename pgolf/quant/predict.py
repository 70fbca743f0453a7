"""Artifact size before training: parameter counts x *measured* bits per weight.

For every tensor the model would export, ``choose_format`` gives its storage format. Bits per
weight are measured, not tabulated: for each distinct (format, row length) a sample of up to
``SAMPLE_ROWS`` rows of i.i.d. N(0, 1) values is quantised and stored through the real export path
(``quantize_state_dict`` + ``encode_artifact`` with the config's packing and codec), and its bytes
per value (scales included) are scaled to the tensor's size. The header is the real JSON layout
with the real names and shapes, compressed.

Why Gaussian samples: trained weight matrices are a Gaussian bulk with heavier tails, and heavier
tails only *lower* the bits per weight of a row-max/quantile grid (the bulk then sits on fewer
levels). A Gaussian therefore gives an upper estimate, which is the useful direction for "will it
fit": ``benchmarks/bench_compression.py`` prints the prediction next to the real artifact of a
trained model. Unit variance keeps every row far above the scale floors (1/31, 1/127); rows under
the floor (small embeddings early in training) code to fewer bits, again below the estimate.
Float formats are measured the same way (fp16/bf16 Gaussians barely compress); fp32 control tensors
count their raw bytes.

Calibrated estimate: how far below the Gaussian a trained model lands depends on training (weight
decay and learning rate push rows under the scale floors; outlier features widen the row max), so
for a preset whose shape matches a recorded submission, ``RECORDS`` holds that submission's logged
compressed size (int8 values + zstd-22, its own export) and the prediction is scaled by
``record bytes / Gaussian estimate of the record's own export``: 0.84 for PR #401's shape, 0.99 for
#89, 0.68 for #201 (many rows under the floor). Other shapes (e.g. ``--profile cpu``) only get
the upper estimate.

At run start (``preflight``): a WARNING when the calibrated estimate (or, without a record, the
upper estimate) is over budget; a NOTE when only the upper estimate is.

The model is built on the ``meta`` device: shapes only, no memory, no initialisation cost.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import torch

SAMPLE_ROWS = 128
_CONTAINER_FIXED = 19 + 4  # preamble + checksum

# Logged compressed model bytes of the recorded submissions (techniques.md section 22), each with
# the export that produced it: int8 values (one per byte) + zstd-22, the preset's formats.
# ``params`` is the record's parameter count: the calibration applies only to that exact shape.
RECORDS = {
    "pr89": {"model_bytes": 15_260_000, "params": 21_778_504, "source": "PR #89 train.log, 3 seeds: 15.06-15.46 MB (midpoint)"},
    "pr201": {"model_bytes": 12_639_639, "params": 26_829_913, "source": "PR #201 train.log, seed 1337"},
    "pr401": {"model_bytes": 15_633_200, "params": 26_993_756, "source": "PR #374 train.log (the shape and export of #401)"},
}


def _meta_state(cfg) -> dict[str, torch.Tensor]:
    """The exported model's state dict on the meta device (shapes and dtypes, no data; training-only
    tensors such as MTP heads are not in the artifact)."""
    from pgolf.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg.model.export_config())
    return dict(model.state_dict())


def _sample_bits(fmt: str, shape: torch.Size, dtype: torch.dtype, qcfg, cache: dict) -> float:
    """Measured stored bits per value of a Gaussian sample with ``shape``'s row length."""
    from pgolf.quant.container import ChunkPlan, encode_artifact
    from pgolf.quant.export import quantize_tensor

    cols = int(torch.Size(shape[1:]).numel()) if len(shape) >= 2 else int(torch.Size(shape).numel())
    rows = min(int(shape[0]), SAMPLE_ROWS) if len(shape) >= 2 else 1
    key = (fmt, rows, cols, dtype)
    if key not in cache:
        if fmt == "fp32" or fmt == "raw":
            cache[key] = 8.0 * torch.empty((), dtype=torch.float32 if fmt == "fp32" else dtype).element_size()
        else:
            g = torch.Generator().manual_seed(0)
            sample = torch.randn(rows, cols, generator=g)
            # a Gaussian sample's size does not depend on a rotation (quant.rotate): estimate unrotated
            qt = quantize_tensor("sample", sample, fmt, dataclasses.replace(qcfg, rotate="none"))
            empty = len(encode_artifact([], {}, ChunkPlan(default_codec=qcfg.codec, packing=qcfg.packing)))
            blob = encode_artifact([qt], {}, ChunkPlan(default_codec=qcfg.codec, packing=qcfg.packing))
            cache[key] = 8.0 * (len(blob) - empty) / sample.numel()
    return cache[key]


def predict_artifact_bytes(cfg, code_bytes: int) -> dict:
    """Predicted model bytes (and artifact = model + code) of a run config, before training:
    the Gaussian upper estimate, and a record-calibrated estimate where a record exists."""
    out = _gaussian_estimate(cfg, code_bytes)
    out["model_bytes_calibrated"] = out["artifact_bytes_calibrated"] = out["calibration"] = None
    record = RECORDS.get(cfg.preset)
    if record is not None:
        params = sum(v["params"] for v in out["by_format"].values())
        if params == record["params"]:  # the record's shape
            import copy

            rec_cfg = copy.deepcopy(cfg)
            rec_cfg.quant.packing, rec_cfg.quant.codec = "int8", "zstd-22"
            factor = record["model_bytes"] / _gaussian_estimate(rec_cfg, 0)["model_bytes"]
            out["model_bytes_calibrated"] = int(round(out["model_bytes"] * factor))
            out["artifact_bytes_calibrated"] = out["model_bytes_calibrated"] + code_bytes
            out["calibration"] = {"factor": factor, **record}
    expected = out["artifact_bytes_calibrated"] or out["artifact_bytes"]
    out["fits"] = expected <= out["budget_bytes"]
    out["fits_upper"] = out["artifact_bytes"] <= out["budget_bytes"]
    return out


def _gaussian_estimate(cfg, code_bytes: int) -> dict:
    from pgolf.quant.export import choose_format

    qcfg = cfg.quant
    cache: dict = {}
    by_format: dict[str, dict] = {}
    total_bits = 0.0
    entries = []
    for name, t in _meta_state(cfg).items():
        shape, dtype, numel = t.shape, t.dtype, t.numel()
        fmt = choose_format(name, t, qcfg)
        bits = _sample_bits(fmt, shape, dtype, qcfg, cache)
        total_bits += bits * numel
        row = by_format.setdefault(fmt, {"tensors": 0, "params": 0, "bytes": 0.0})
        row["tensors"] += 1
        row["params"] += numel
        row["bytes"] += bits * numel / 8
        entries.append([name, list(shape), str(dtype).removeprefix("torch."), fmt, [["v", 0, 1000000, 1000000, "i8", "entropy"]]])
    header = len(zlib.compress(json.dumps({"meta": {"model": vars(cfg.model), "preset": cfg.preset}, "chunks": [["zstd-22", 1, 1]] * 8,
                                           "tensors": entries}, separators=(",", ":"), default=str).encode(), 9))
    model_bytes = int(round(total_bits / 8)) + header + _CONTAINER_FIXED
    for row in by_format.values():
        row["bits_per_weight"] = 8 * row["bytes"] / max(row["params"], 1)
        row["bytes"] = int(round(row["bytes"]))
    artifact = model_bytes + code_bytes
    return {
        "model_bytes": model_bytes,
        "code_bytes": code_bytes,
        "artifact_bytes": artifact,
        "budget_bytes": qcfg.budget_bytes,
        "fits": artifact <= qcfg.budget_bytes,
        "header_bytes": header,
        "by_format": by_format,
        "packing": qcfg.packing,
        "codec": qcfg.codec,
        "method": f"bits/weight measured on N(0,1) samples of <= {SAMPLE_ROWS} rows through the export path (an upper estimate for trained weights)",
    }


def preflight(cfg, code_bytes: int, log) -> dict:
    """At run start: warn (``log(str)``) when the predicted artifact does not fit the budget.
    (The libraries the export needs are checked by ``pgolf.quant.codecs.require_export_libraries``.)"""
    pred = predict_artifact_bytes(cfg, code_bytes)
    budget = pred["budget_bytes"]
    calibrated = pred["artifact_bytes_calibrated"]
    log(f"predicted_artifact_bytes upper:{pred['artifact_bytes']} calibrated:{calibrated} code:{code_bytes} budget:{budget}")
    advice = "use fewer bits (quant.*_format), quant.packing=auto, quant.codec=auto, or a smaller model"
    expected = calibrated if calibrated is not None else pred["artifact_bytes"]
    if expected > budget:
        what = f"calibrated on {pred['calibration']['source']}" if calibrated is not None else "upper estimate from Gaussian samples"
        log(f"WARNING: the predicted artifact ({expected:,} B, {what}) is over the {budget:,}-byte budget by {expected - budget:,} B; {advice}")
    elif pred["artifact_bytes"] > budget:
        log(f"NOTE: the artifact may not fit: the upper estimate ({pred['artifact_bytes']:,} B, Gaussian weights) is over the "
            f"{budget:,}-byte budget; the record-calibrated estimate is {calibrated:,} B")
    return pred
