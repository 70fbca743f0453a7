"""The artifact as the metric: quantise, compress, write atomically, count bytes against the
budget, and reload from disk into a fresh model.

The budget is decimal (16,000,000 bytes by default) and covers code bytes + model bytes. A run
over budget still writes everything (the artifact, logs, summary) and then fails with a clear
error; nothing is ever silently shrunk or recompressed with another codec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf.errors import ArtifactError, BudgetExceededError
from pgolf.model.config import ModelConfig
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact, read_artifact, write_bytes_atomic
from pgolf.quant.export import QTensor, dequantize_state_dict, quantize_state_dict

ARTIFACT_NAME = "final_model.pgolf"
ARTIFACT_FORMAT = "pgolf-artifact"


@dataclass
class ArtifactReport:
    path: str
    model_bytes: int
    code_bytes: int
    budget_bytes: int
    payload_bytes: int  # uncompressed tensor bytes (integers counted one per byte)
    codec: str
    packing: str = "auto"
    choices: dict | None = None  # "packing+codec" -> number of value streams that chose it

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "artifact_bytes": self.total_bytes, "fits": self.fits}


def artifact_meta(model_cfg: ModelConfig, extra: dict | None = None) -> dict:
    import pgolf

    return {"format": ARTIFACT_FORMAT, "pgolf": pgolf.__version__, "model": asdict(model_cfg), **(extra or {})}


def payload_bytes(qtensors: list[QTensor]) -> int:
    total = 0
    for qt in qtensors:
        total += qt.values.numel() * qt.values.element_size()
        if qt.scale is not None:
            total += qt.scale.numel() * qt.scale.element_size()
    return total


def file_tensors(qtensors: list[QTensor], qcfg: QuantConfig) -> tuple[list[QTensor], dict]:
    """The quantised tensors as the file holds them, and what the meta says about it: with
    ``quant.hidden_order=greedy`` the MLPs' hidden units relabelled (``pgolf.quant.hidden_order``),
    else the tensors themselves."""
    if qcfg.hidden_order != "greedy":
        return qtensors, {}
    from pgolf.quant.hidden_order import order_mlp_hidden

    stored, reordered = order_mlp_hidden(qtensors)
    return stored, {"hidden_order": {"rule": "greedy_l1", "mlps": len(reordered)}}


def build_artifact(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    qcfg: QuantConfig,
    path: str | Path,
    *,
    code_bytes: int,
    meta_extra: dict | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[ArtifactReport, list[QTensor]]:
    """Quantise ``state_dict`` by ``qcfg`` (GPTQ for the weights that have a Hessian in
    ``hessians``), write the container to ``path`` atomically, and re-read it: the report's
    choices come from the file itself, and a file that does not decode is never reported as fine.
    Training-only parts are left out first (``pgolf.model.export_view``: MTP heads dropped, tanh-
    reparameterised weights stored as their effective values, the meta's config the plain model's).
    The returned tensors are in the model's own order; with ``quant.hidden_order=greedy`` the file
    holds them with the MLPs' hidden units relabelled (``pgolf.quant.hidden_order``)."""
    from pgolf.model.export_view import artifact_view

    state_dict, model_cfg = artifact_view(state_dict, model_cfg)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    qtensors = quantize_state_dict(cpu_state, qcfg, hessians)
    stored, file_meta = file_tensors(qtensors, qcfg)
    extra = {**(meta_extra or {}), "code_bytes": code_bytes, "budget_bytes": qcfg.budget_bytes, "gptq": bool(hessians), **file_meta}
    plan = ChunkPlan(default_codec=qcfg.codec, packing=qcfg.packing, progress=progress)
    blob = encode_artifact(stored, artifact_meta(model_cfg, extra), plan)
    contents = decode_artifact(blob, str(path))
    choices: dict[str, int] = {}
    for info in contents.tensors:
        v = info.streams["v"]
        key = f"{v.packing}+{v.codec}"
        choices[key] = choices.get(key, 0) + 1
    write_bytes_atomic(path, blob)
    report = ArtifactReport(str(path), len(blob), code_bytes, qcfg.budget_bytes, payload_bytes(qtensors), qcfg.codec, qcfg.packing, choices)
    return report, qtensors


def check_budget(report: ArtifactReport) -> None:
    if not report.fits:
        over = report.total_bytes - report.budget_bytes
        raise BudgetExceededError(
            f"{report.path}: artifact is {report.total_bytes:,} bytes (code {report.code_bytes:,} + model "
            f"{report.model_bytes:,}), {over:,} over the {report.budget_bytes:,}-byte budget; shrink the model, use "
            "fewer bits (quant.*_format) or a stronger codec (quant.codec)"
        )


def load_artifact_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, dequantised state dict) of an artifact file; never executes code."""
    meta, qtensors = read_artifact(path)
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT or "model" not in meta:
        raise ArtifactError(f"{path}: artifact metadata does not describe a pgolf model")
    return meta, dequantize_state_dict(qtensors)


def model_config_from_meta(meta: dict, source: str) -> ModelConfig:
    """The ModelConfig an artifact records, each value checked against the field's type (JSON
    gives ints where a float field was a whole number); an unknown key or a wrong type is an
    ArtifactError, never a silently different model."""
    from dataclasses import MISSING, fields

    values = meta["model"]
    if not isinstance(values, dict):
        raise ArtifactError(f"{source}: the model metadata is not a table")
    known = {f.name: f for f in fields(ModelConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ArtifactError(f"{source}: model metadata has unknown key(s) {unknown}; the artifact was written by another pgolf version")
    typed = {}
    for name, value in values.items():
        f = known[name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, float):
            ok, value = isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ArtifactError(f"{source}: model.{name} = {value!r} in the metadata is not a {type(default).__name__}")
        typed[name] = value
    cfg = ModelConfig(**typed)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ArtifactError(f"{source}: {exc}") from None
    return cfg


def load_artifact_model(path: str | Path, device: torch.device | str = "cpu", attention_backend: str | None = None):
    """A fresh GPT built from the artifact's own config, loaded strictly with its weights."""
    from pgolf.model.gpt import build_model

    meta, state = load_artifact_state(path)
    model_cfg = model_config_from_meta(meta, str(path))
    if attention_backend:
        model_cfg.attention_backend = attention_backend
    model = build_model(model_cfg, device)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ArtifactError(f"{path}: {name} has shape {tuple(t.shape)}, the model needs {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))
    return model, meta
