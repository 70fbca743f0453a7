"""pgolf's coder against the records' compressors on the same quantised integers, with timings.

    python benchmarks/bench_compression.py --run RUN_DIR [--run RUN_DIR ...] [--quant-preset pr1855]
        [--packing auto] [--set quant.KEY=VALUE ...] [--no-gptq] [--no-lrzip] [--out DIR]

For each finished run (a folder with ``config.json`` and ``final_model.raw.pgolf``; train one with
``pgolf train ... --out RUN_DIR``) the raw weights are quantised once with the quantisation of
``--quant-preset`` as it is now (default: the run's own preset; pr1855 = SDClip int6/int7 GPTQ
with the final-norm embedding Hessian, int8 quant-gates, LQER asym) and GPTQ calibrated on the
run's training shards (``--no-gptq``: rounding only). The *same* integers are then stored by:

* pgolf: its container, ``quant.packing`` (default auto: per tensor the smallest of bit-packing,
  the order-0 range coder and the context coder) and ``quant.codec`` for the rest;
* zstd-22 and byte-shuffled brotli-11 (R3-R6) of the whole model's streams;
* R7's per-group lrzip scheme, when the ``lrzip`` binary is installed (slow: ZPAQ);
* the order-0 entropy bound (per tensor) of the integers + pgolf's bytes for the rest.

It prints the ``pgolf inspect --artifact --json`` codecs table (per R7 group and in total), the
encode and decode seconds of every scheme, and pgolf's ratios to the targets of issue 12
(<= 0.97 x brotli-11-shuffle, <= 0.99 x lrzip-pergroup). The artifacts go to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quantise(run: Path, preset: str | None, gptq: bool, packing: str | None, overrides: list[str] | None = None):
    from pgolf.cli.quant import _device, _model_with, load_run
    from pgolf.quant.export import quantize_state_dict

    cfg, state, meta, summary = load_run(run, overrides or [], preset)
    if packing:
        cfg.quant.packing = packing
    hessians, calib_s = None, 0.0
    if gptq and cfg.quant.gptq == "full":
        from pgolf.quant.calib import calibration_source
        from pgolf.quant.gptq import collect_hessians
        from pgolf.train.setup import autocast_dtype

        device = _device(cfg)
        t0 = time.perf_counter()
        model = _model_with(cfg, state, device)
        amp = autocast_dtype(cfg.train, device)
        hessians = collect_hessians(model, calibration_source(cfg, model, amp), cfg.quant, amp_dtype=amp)
        calib_s = time.perf_counter() - t0
        del model
    t0 = time.perf_counter()
    qtensors = quantize_state_dict({k: v.cpu() for k, v in state.items()}, cfg.quant, hessians)
    return cfg, qtensors, summary, calib_s, time.perf_counter() - t0


def bench(run: Path, args) -> dict:
    from pgolf.quant.compare import codec_comparison
    from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact, write_bytes_atomic
    from pgolf.quant.report import format_codecs
    from pgolf.quant.artifact import artifact_meta, file_tensors

    import json

    # default: the quantisation of the run's preset as it is now, not the run's own [quant] (a run
    # may have been trained with a cheap export, e.g. --set quant.packing=bitpack)
    preset = args.quant_preset or json.loads((run / "config.json").read_text(encoding="utf-8")).get("preset")
    cfg, qtensors, summary, calib_s, quant_s = quantise(run, preset, not args.no_gptq, args.packing, args.overrides)
    params = sum(q.numel for q in qtensors)
    qtensors, file_meta = file_tensors(qtensors, cfg.quant)  # every codec compares the integers the file holds
    meta = artifact_meta(cfg.model, {"preset": cfg.preset, "profile": cfg.profile, **file_meta})
    t0 = time.perf_counter()
    blob = encode_artifact(qtensors, meta, ChunkPlan(default_codec=cfg.quant.codec, packing=cfg.quant.packing))
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    contents = decode_artifact(blob)
    dec_s = time.perf_counter() - t0
    out = Path(args.out) / f"{run.name}.pgolf"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, blob)
    value_bytes = {qt.name: info.streams["v"].stored_bytes for qt, info in zip(contents.qtensors, contents.tensors)}
    choices: dict[str, int] = {}
    for info in contents.tensors:
        if info.fmt.startswith("int"):
            key = info.streams["v"].packing
            choices[key] = choices.get(key, 0) + 1
    rep = codec_comparison(qtensors, len(blob), value_bytes, lrzip=not args.no_lrzip, timings=True)
    rep["codec_seconds"]["pgolf"] = enc_s
    rep["codec_decode_seconds"]["pgolf"] = dec_s
    lqer = [q.name for q in qtensors if q.lqer is not None]
    print(f"\n== {run} (preset {cfg.preset}, profile {cfg.profile}, {summary.get('steps', '?')} steps, {params:,} params; quant of "
          f"{preset}: mlp {cfg.quant.mlp_format} k {cfg.quant.sdclip_k_mlp}, attn {cfg.quant.attn_format} "
          f"k {cfg.quant.sdclip_k_attn}, embed {cfg.quant.embed_format} k {cfg.quant.sdclip_k_embed}; GPTQ "
          f"{'on' if calib_s else 'off'}; LQER on {lqer})")
    print(f"calibration {calib_s:.1f} s, quantisation {quant_s:.1f} s; pgolf packings chosen: {choices}; artifact {out}")
    print(format_codecs(rep))
    names = ("pgolf", "zstd-22", "brotli-11-shuffle", "lrzip-pergroup")
    print(f"{'seconds':<12} " + " ".join(f"{n:>17}" for n in names))
    for label, key in (("encode", "codec_seconds"), ("decode", "codec_decode_seconds")):
        print(f"{label:<12} " + " ".join(f"{rep[key][n]:>17.1f}" if n in rep[key] else f"{'-':>17}" for n in names))
    c = rep["codecs"]
    targets = [f"pgolf / brotli-11-shuffle = {c['pgolf'] / c['brotli-11-shuffle']:.4f} (target <= 0.97)"]
    if c["lrzip-pergroup"]:
        targets.append(f"pgolf / lrzip-pergroup = {c['pgolf'] / c['lrzip-pergroup']:.4f} (target <= 0.99)")
    print("; ".join(targets))
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a finished run folder (repeatable)")
    ap.add_argument("--quant-preset", default=None, help="quantise with this preset's quant settings (default: the run's preset)")
    ap.add_argument("--packing", default=None, help="override quant.packing (auto, ctx, entropy, bitpack, int8)")
    ap.add_argument("--no-gptq", action="store_true", help="round to nearest instead of GPTQ")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="quant.KEY=VALUE",
                    help="override a quant.* (or data.*) value after --quant-preset, e.g. quant.gptq_calib_batches=2 (repeatable)")
    ap.add_argument("--no-lrzip", action="store_true", help="skip R7's per-group lrzip scheme (slow)")
    ap.add_argument("--out", default="/tmp/bench_compression", help="folder for the artifacts written")
    args = ap.parse_args()
    for run in args.run:
        bench(Path(run), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
