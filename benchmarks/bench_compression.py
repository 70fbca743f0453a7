"""Bytes of one trained model's quantised weights under each packing/codec, against the entropy bound.

    python benchmarks/bench_compression.py [--run RUN_DIR] [--data /tmp/fw]

Uses a finished ``pr401 --profile cpu`` run (its ``final_model.raw.pgolf``); without ``--run`` (or
if the folder has no run) it trains one first (``quant.small_numel=4096``, see below; ~3-30 min on
2 CPU cores depending on load). The weights are quantised once with the run's formats (int6 row-max
blocks, int8 embeddings, fp16/fp32 small tensors), then the *same quantised values* are stored:

* int8+zstd-22: one integer per byte, everything in one zstd-22 stream (what the submissions did,
  minus the pickle);
* bitpack+zstd-22: N-bit packed integers, the rest as above;
* entropy: integers range-coded (row/column-group contexts), the rest in one zstd-22 stream;
* auto: the smallest packing and codec per tensor (``quant.packing=auto quant.codec=auto``);
* and, for reference, the submissions' own format: ``torch.save`` (a pickle) + zstd-22.

It prints one table: model bytes, integer-payload bytes, their ratio to int8+zstd-22 and to the
summed entropy bound (order-0 under the coder's contexts; and order-0 per tensor), export time,
plus the size predicted before training (Gaussian samples) next to the real size.

Why ``quant.small_numel=4096``: the cpu profile shrinks width 512 -> 128, so every block matrix
(<= 49,152 elements) would fall under the full-scale 65,536 passthrough threshold and be stored
fp16: nothing would be quantised. 4096 = 65,536 x (128/512)^2 keeps the full-scale split (block
matrices int6, the small projections and control tensors float).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def submission_blob(qtensors) -> bytes:
    """The submissions' container for the same values: torch.save of {"w": tensors, "m": meta}
    (int8 values + fp16 scales + passthrough tensors), as PR #201/#401 wrote it before zstd."""
    import io

    import torch

    w, m = {}, {}
    for q in qtensors:
        if q.scale is not None:
            w[q.name + ".q"], w[q.name + ".scale"] = q.values.reshape(q.shape), q.scale
            m[q.name] = {"type": q.fmt.split(":")[0]}
        else:
            w[q.name] = q.values.reshape(q.shape)
            m[q.name] = "passthrough"
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    return buf.getvalue()


def ensure_run(run: Path, data: str) -> None:
    if (run / "final_model.raw.pgolf").is_file():
        return
    cmd = [sys.executable, "-m", "pgolf", "train", "--preset", "pr401", "--profile", "cpu", "--data", data, "--out", str(run),
           "--set", "quant.small_numel=4096"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="/tmp/qruns/qat_off", help="a finished pr401 --profile cpu run folder (trained if absent)")
    ap.add_argument("--data", default="/tmp/fw", help="data folder for training when the run is absent")
    ap.add_argument("--out", default="/tmp/bench_compression", help="folder for the artifacts written")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    ensure_run(run, args.data)
    out.mkdir(parents=True, exist_ok=True)

    from pgolf.cli.quant import load_run
    from pgolf.quant.codecs import compress
    from pgolf.quant.container import ChunkPlan, encode_artifact, write_bytes_atomic
    from pgolf.quant.export import quantize_state_dict
    from pgolf.quant.predict import predict_artifact_bytes
    from pgolf.quant.report import artifact_report
    from pgolf.submit.artifact import artifact_meta

    cfg, state, meta, summary = load_run(run, [])
    qtensors = quantize_state_dict(state, cfg.quant)  # quantised once: every method stores these values
    ints = [q for q in qtensors if q.scale is not None]
    int8_payload = len(compress("zstd-22", b"".join(q.values.numpy().tobytes() for q in ints)))
    meta_out = artifact_meta(cfg.model, {"preset": cfg.preset, "profile": cfg.profile, "code_bytes": summary.get("code_bytes"),
                                         "budget_bytes": cfg.quant.budget_bytes})
    methods = [("int8+zstd-22", "zstd-22", "int8"), ("bitpack+zstd-22", "zstd-22", "bitpack"), ("entropy (+zstd-22)", "zstd-22", "entropy"),
               ("auto packing+codec", "auto", "auto")]
    rows = []
    for label, codec, packing in methods:
        t0 = time.perf_counter()
        blob = encode_artifact(qtensors, meta_out, ChunkPlan(default_codec=codec, packing=packing))
        seconds = time.perf_counter() - t0
        path = out / f"{packing}_{codec}.pgolf"
        write_bytes_atomic(path, blob)
        rep = artifact_report(path)
        t = rep["totals"]
        payload = int8_payload if packing == "int8" else t["int_payload_bytes"]  # a shared chunk's split is only prorated
        rows.append((label, len(blob), payload, t, seconds))
    t0 = time.perf_counter()
    sub_bytes = len(compress("zstd-22", submission_blob(qtensors)))
    sub_seconds = time.perf_counter() - t0
    base_model, base_payload = rows[0][1], rows[0][2]
    t = rows[-1][3]
    bound, bound0 = t["entropy_bound_bytes"], t["entropy_bound_order0_bytes"]
    nonint = t["model_bytes"] - t["int_payload_bytes"]
    print(f"run {run}: preset {cfg.preset} profile {cfg.profile}, {summary.get('steps', '?')} steps, "
          f"{t['int_params']:,} integer params of {t['params']:,}; formats attn/mlp {cfg.quant.mlp_format}, embed {cfg.quant.embed_format}")
    print(f"{'method':<22} {'model B':>10} {'vs int8+zstd':>12} {'int payload B':>14} {'vs int8+zstd':>12} {'payload/bound':>13} "
          f"{'payload/order0':>14} {'export s':>8}")
    print(f"{'torch.save+zstd-22':<22} {sub_bytes:>10,} {sub_bytes / base_model - 1:>+12.2%} {'':>14} {'':>12} {'':>13} {'':>14} {sub_seconds:>8.1f}"
          "   (the submissions' format: pickle + int8 + zstd-22)")
    for label, model_bytes, payload, _, seconds in rows:
        print(f"{label:<22} {model_bytes:>10,} {model_bytes / base_model - 1:>+12.2%} {payload:>14,} {payload / base_payload - 1:>+12.2%} "
              f"{payload / bound:>13.4f} {payload / bound0:>14.4f} {seconds:>8.1f}")
    print(f"{'entropy bound (ctx)':<22} {bound + nonint:>10,} {(bound + nonint) / base_model - 1:>+12.2%} {bound:>14,} "
          f"{bound / base_payload - 1:>+12.2%}   (+ auto's non-integer bytes {nonint:,}: scales, floats, header)")
    print(f"{'entropy bound (order0)':<22} {bound0 + nonint:>10,} {(bound0 + nonint) / base_model - 1:>+12.2%} {bound0:>14,} {bound0 / base_payload - 1:>+12.2%}")
    print(f"auto vs torch.save+zstd-22: {rows[-1][1] / sub_bytes - 1:+.2%}; auto model bytes vs (bound + non-integer bytes): "
          f"{rows[-1][1] / (bound + nonint) - 1:+.2%} (ctx), {rows[-1][1] / (bound0 + nonint) - 1:+.2%} (order-0)")
    by_fmt: dict[str, list] = {}
    auto_rows = {r["name"]: r for r in artifact_report(out / "auto_auto.pgolf")["tensors"]}
    for q in ints:
        g = by_fmt.setdefault(q.fmt, [0, [], 0.0, 0.0, 0.0])
        g[0] += q.numel
        g[1].append(q.values.numpy().tobytes())
        r = auto_rows[q.name]
        g[2] += r["payload_bytes"]
        g[3] += r["bound_bytes"]
        g[4] += r["bound_order0_bytes"]
    print(f"{'integer values by format':<24} {'params':>10} {'int8+zstd B':>12} {'auto B':>10} {'auto vs int8+zstd':>17} {'bound(ctx) B':>12} {'order0 B':>10}")
    for fmt, (n, parts, auto_b, b_ctx, b0) in by_fmt.items():
        z = len(compress("zstd-22", b"".join(parts)))
        print(f"{fmt:<24} {n:>10,} {z:>12,} {auto_b:>10,.0f} {auto_b / z - 1:>+17.2%} {b_ctx:>12,.0f} {b0:>10,.0f}")
    pred = predict_artifact_bytes(cfg, summary.get("code_bytes") or 0)
    actual = (run / "final_model.pgolf").stat().st_size
    print(f"predicted before training (Gaussian samples, packing {cfg.quant.packing}, codec {cfg.quant.codec}): {pred['model_bytes']:,} B; "
          f"the run's own artifact: {actual:,} B (prediction / actual {pred['model_bytes'] / actual:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
