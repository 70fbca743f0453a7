"""``pgolf export``: re-export a finished run's raw weights with another quantisation config.

    pgolf export --run RUN_DIR [--quant-preset NAME] [--set quant.k=v ...] --out FILE [--eval] [--json]

Reads ``RUN_DIR/config.json`` and the unquantised weights ``RUN_DIR/final_model.raw.pgolf``
(written by every run with ``train.save_raw``), optionally replaces the run's ``[quant]`` settings by
those of a preset as it is now (``--quant-preset``, with the run's profile), applies the ``--set`` overrides (``quant.*`` and,
for GPTQ calibration, ``data.*`` keys only: the model is fixed), runs GPTQ when ``quant.gptq=full``
(calibration from the run's training shards or self-generated text), writes the artifact and
prints its bytes against the budget. ``--eval`` also evaluates the round-tripped artifact (standard
eval on the run's validation shards) and reports the quantisation gap against the run's
pre-quantisation val_bpb (``--eval-raw`` re-measures that too).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pgolf.cli.common import print_json
from pgolf.errors import ArtifactError, ConfigError

RAW_NAME = "final_model.raw.pgolf"


def register(sub) -> None:
    p = sub.add_parser("export", help="re-export a run's raw weights with another quant config (bytes, optional round-trip eval)")
    p.add_argument("--run", required=True, help="run folder (has config.json and final_model.raw.pgolf)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="quant.KEY=VALUE", help="override a quant.* (or data.*) value (repeatable)")
    p.add_argument("--quant-preset", default=None, metavar="PRESET",
                   help="use this preset's current quant settings (with the run's profile) instead of the run's own")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--eval", action="store_true", help="evaluate the round-tripped artifact (standard eval, val_bpb)")
    p.add_argument("--eval-raw", action="store_true", help="also re-evaluate the unquantised weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def load_run(run_dir: Path, overrides: list[str], quant_preset: str | None = None):
    """(cfg, raw state dict, raw meta, summary) of a run folder, with quant/data overrides applied
    (after the quant settings of ``quant_preset``, when given)."""
    from pgolf.config import from_dict, load_config, parse_set_args, set_value
    from pgolf.quant.container import read_artifact
    from pgolf.quant.export import dequantize_state_dict

    cfg_path, raw_path = run_dir / "config.json", run_dir / RAW_NAME
    if not cfg_path.is_file() or not raw_path.is_file():
        raise ConfigError(f"{run_dir}: not a finished run folder (needs config.json and {RAW_NAME}; train with train.save_raw=true)")
    cfg = from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    if quant_preset:
        profile = cfg.profile if cfg.profile not in (None, "none") else None
        small = cfg.quant.small_numel  # the run's passthrough threshold belongs to its model size, not the recipe
        cfg.quant = load_config(quant_preset, profile).quant
        cfg.quant.small_numel = small
    for key, value in parse_set_args(overrides):
        if not key.startswith(("quant.", "data.")):
            raise ConfigError(f"--set {key}: export can only change quant.* (and data.* for calibration) keys; the model is fixed")
        set_value(cfg, key, value)
    cfg.validate()
    cfg.model = cfg.model.export_config()  # the raw file holds the exported model (no MTP heads, effective weights)
    meta, qtensors = read_artifact(raw_path)
    if not meta.get("raw"):
        raise ArtifactError(f"{raw_path}: not a raw-weights file")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return cfg, dequantize_state_dict(qtensors), meta, summary


def _device(cfg):
    import torch

    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _model_with(cfg, state, device):
    from pgolf.model.gpt import build_model
    from pgolf.train.setup import apply_precision

    model = build_model(cfg.model, device)
    apply_precision(model, cfg.train, device)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return model


def _evaluate(model, cfg, device) -> float:
    from pgolf.eval.bpb import load_byte_counter
    from pgolf.eval.standard import evaluate_standard, load_validation_tokens
    from pgolf.train.loop import resolve_data
    from pgolf.train.setup import autocast_dtype

    _, val_files, _, sp = resolve_data(cfg)
    val = load_validation_tokens(val_files, cfg.eval_seq_len, cfg.eval.max_val_tokens)
    lut = load_byte_counter(sp, cfg.model.vocab_size, val_files, val, cfg.data.path)
    model.eval()
    model.set_eval_temperature(cfg.eval.temperature)
    res = evaluate_standard(model.token_nll, val, cfg.eval_seq_len, lut, batch_tokens=cfg.eval.val_batch_tokens, device=device,
                            autocast_dtype=autocast_dtype(cfg.train, device), progress=True)
    return res.val_bpb


def export_run(run_dir: str | Path, overrides: list[str], out: str | Path, *, evaluate: bool = False, evaluate_raw: bool = False,
               quant_preset: str | None = None) -> dict:
    """Re-export a run (see the module docstring); returns the result dict that the CLI prints."""
    from pgolf.quant.artifact import build_artifact, load_artifact_model
    from pgolf.train.codesize import package_code_bytes
    from pgolf.train.setup import apply_precision, autocast_dtype

    run_dir = Path(run_dir)
    cfg, state, meta, summary = load_run(run_dir, overrides, quant_preset)
    device = _device(cfg)
    hessians, gptq_seconds, calib = None, 0.0, None
    if cfg.quant.gptq == "full":
        from pgolf.quant.calib import calibration_source
        from pgolf.quant.gptq import collect_hessians

        t0 = time.perf_counter()
        model = _model_with(cfg, state, device)
        source = calibration_source(cfg, model, autocast_dtype(cfg.train, device))
        calib = source.describe()
        hessians = collect_hessians(model, source, cfg.quant, amp_dtype=autocast_dtype(cfg.train, device), progress=True)
        gptq_seconds = time.perf_counter() - t0
        del model
    code = summary.get("code_bytes") or package_code_bytes()
    extra = {k: meta[k] for k in ("preset", "profile", "train_seq_len", "eval_seq_len") if k in meta}
    t0 = time.perf_counter()
    report, qtensors = build_artifact(state, cfg.model, cfg.quant, out, code_bytes=code, meta_extra=extra, hessians=hessians, progress=True)
    result = {"run": str(run_dir), "out": str(out), **report.as_dict(), "export_seconds": time.perf_counter() - t0,
              "lqer": [qt.name for qt in qtensors if qt.lqer is not None],
              "quant": {k: v for k, v in vars(cfg.quant).items() if k != "control_patterns"}}
    if hessians is not None:
        result.update(gptq_seconds=gptq_seconds, gptq_layers=len(hessians), calibration=calib)
    if evaluate or evaluate_raw:
        prequant = summary.get("val_bpb_prequant")
        if evaluate_raw or prequant is None:
            prequant = _evaluate(_model_with(cfg, state, device), cfg, device)
        result["val_bpb_prequant"] = prequant
        if evaluate:
            fresh, _ = load_artifact_model(out, device, cfg.model.attention_backend)
            apply_precision(fresh, cfg.train, device)
            result["val_bpb_roundtrip"] = _evaluate(fresh, cfg, device)
            result["quant_gap"] = result["val_bpb_roundtrip"] - prequant
    return result


def run(args: argparse.Namespace) -> int:
    result = export_run(args.run, args.overrides, args.out, evaluate=args.eval, evaluate_raw=args.eval_raw, quant_preset=args.quant_preset)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['out']}: model {result['model_bytes']:,} B + code {result['code_bytes']:,} B = {result['artifact_bytes']:,} B "
          f"of {result['budget_bytes']:,} B ({'fits' if result['fits'] else 'OVER BUDGET'}); choices {result['choices']}")
    if "gptq_seconds" in result:
        print(f"gptq: {result['gptq_layers']} layers calibrated on {result['calibration']} in {result['gptq_seconds']:.1f}s")
    if "val_bpb_roundtrip" in result:
        print(f"val_bpb prequant {result['val_bpb_prequant']:.4f} roundtrip {result['val_bpb_roundtrip']:.4f} gap {result['quant_gap']:+.4f}")
    return 0
