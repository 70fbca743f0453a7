"""Quantisation gap (round-trip val_bpb minus pre-quantisation val_bpb, standard eval) of int6 at
``--profile cpu``: without QAT, with late / always-on QAT, and with GPTQ and the per-row clip search.

    python benchmarks/bench_quant_gap.py [--runs /tmp/qruns] [--data /tmp/fw] [--iterations 200] [--skip-train]

Trains (or reuses) ``pr401 --profile cpu`` runs with ``quant.qat`` = off, late and always (each with
``quant.small_numel=4096``, see bench_compression.py, and a fixed ``train.iterations`` instead of the
150 s cap so that the runs are comparable on a loaded machine; no sliding-window eval, which costs
~30 min on 2 cores and is not part of the gap), then re-exports the raw weights of
the runs with ``quant.gptq=full`` (calibration on training shards, and on self-generated text) and
with ``int6:search`` (per-row clip search) and evaluates each round trip. Prints one table; every
gap is measured against the same run's pre-quantisation val_bpb (the run's own standard eval of
the exported weights, EMA/SWA applied).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPORTS = [
    ("gptq (train calib)", ["quant.gptq=full", "quant.gptq_calib_source=train"]),
    ("gptq (self calib)", ["quant.gptq=full", "quant.gptq_calib_source=self"]),
    ("per-row clip search", ["quant.attn_format=int6:search:full", "quant.mlp_format=int6:search:full"]),
]


def train(run: Path, qat: str, data: str, iterations: int) -> None:
    if (run / "summary.json").is_file():
        return
    cmd = [sys.executable, "-m", "pgolf", "train", "--preset", "pr401", "--profile", "cpu", "--data", data, "--out", str(run),
           "--set", "quant.small_numel=4096", "--set", f"quant.qat={qat}", "--set", "train.max_wallclock_seconds=0",
           "--set", f"train.iterations={iterations}", "--set", "eval.sliding_stride=0"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="/tmp/qruns", help="folder holding qat_off, qat_late, qat_always (trained if absent)")
    ap.add_argument("--data", default="/tmp/fw")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--modes", default="off,late,always", help="QAT modes to train/report")
    ap.add_argument("--exports-for", default="off,late", help="runs whose raw weights are re-exported with GPTQ / clip search")
    args = ap.parse_args()

    from pgolf.cli.quant import export_run

    root = Path(args.runs)
    rows = []
    for qat in args.modes.split(","):
        run = root / f"qat_{qat}"
        train(run, qat, args.data, args.iterations)
        s = json.loads((run / "summary.json").read_text())
        rows.append((f"int6, QAT {qat}", "round to nearest", s["steps"], s["val_bpb_prequant"], s["val_bpb_roundtrip"], s["model_bytes"], None))
        if qat in args.exports_for.split(","):
            for i, (label, sets) in enumerate(EXPORTS):
                cache = root / f"qat_{qat}_export{i}.json"  # `pgolf export --json` output of the same export
                if cache.is_file():
                    res = json.loads(cache.read_text())
                else:
                    res = export_run(run, sets, root / f"qat_{qat}_export{i}.pgolf", evaluate=True)
                    cache.write_text(json.dumps(res, default=float))
                rows.append((f"int6, QAT {qat}", label, s["steps"], res["val_bpb_prequant"], res["val_bpb_roundtrip"], res["model_bytes"],
                             res.get("gptq_seconds")))
    print(f"{'run':<18} {'export':<22} {'steps':>5} {'prequant':>9} {'roundtrip':>9} {'gap':>8} {'model B':>10} {'gptq s':>7}")
    for run, export, steps, pre, post, nbytes, gsec in rows:
        print(f"{run:<18} {export:<22} {steps:>5} {pre:>9.4f} {post:>9.4f} {post - pre:>+8.4f} {nbytes:>10,} {'' if gsec is None else f'{gsec:.1f}':>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
