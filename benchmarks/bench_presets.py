"""Every preset's whole stack at a profile, trained for a fixed number of steps: one table.

    python benchmarks/bench_presets.py [--presets pr549,pr1218,...] [--profile cpu] [--steps 30]
                                       [--data DIR] [--out DIR] [--json]

Each preset trains on the demo variant its configuration needs (the preset's vocabulary, CaseOps
with byte sidecars for R6/R7; built once and cached, no network) unless ``--data`` is given, for
``--steps`` steps with no wallclock cap, then exports, reloads and scores a validation prefix
(``--val-tokens``, standard eval only: a comparison at equal steps, not a score). Quality is
compared at a fixed step count, not a wallclock (the machine is shared and noisy); tokens/s is
this run's, comparable only between rows of one table.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from pgolf.config import load_config
from pgolf.data.demo import demo_for_config
from pgolf.train.run import run_training

FRONTIER = "pr549,pr1218,pr1394,pr1493,pr1787,pr1855"


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "log.txt").read_text().splitlines()
    return {int(m.group(1)): float(m.group(2)) for m in (re.match(r"step:(\d+)/\d+ train_loss:([0-9.]+)", ln) for ln in lines) if m}


def bench(preset: str, profile: str, steps: int, data: str | None, out: Path, val_tokens: int) -> dict:
    overrides = [("train.iterations", steps), ("train.max_wallclock_seconds", 0.0), ("train.train_log_every", 1),
                 ("train.progress", False), ("eval.sliding_stride", 0), ("eval.max_val_tokens", val_tokens),
                 ("ttt.mode", "off")]
    cfg = load_config(preset, profile, overrides)
    data_dir = Path(data) if data else demo_for_config(cfg, progress=False)
    cfg = load_config(preset, profile, overrides + [("data.path", str(data_dir))])
    s = run_training(cfg, out / preset)
    losses = train_losses(out / preset)
    return {"preset": preset, "data": data_dir.name, "params": s["params"], "steps": s["steps"],
            "tokens_per_second": s["tokens_per_second"], "train_loss_first": losses[min(losses)],
            "train_loss_last": losses[max(losses)], "val_bpb_prequant": s["val_bpb_prequant"],
            "val_bpb_roundtrip": s["val_bpb_roundtrip"], "val_targets": s["val_targets"], "model_bytes": s["model_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=FRONTIER)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--val-tokens", type=int, default=32768)
    ap.add_argument("--data", default=None, help="a data folder for every preset (default: the demo variant each needs)")
    ap.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows = [bench(p, args.profile, args.steps, args.data, out, args.val_tokens) for p in args.presets.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"profile={args.profile} steps={args.steps} val prefix={args.val_tokens} tokens (a comparison, not a score)")
    print(f"{'preset':<8}{'data':<26}{'params':>11}{'steps':>6}{'tokens/s':>10}{'loss@1':>8}{f'loss@{args.steps}':>9}"
          f"{'bpb pre':>9}{'bpb rt':>8}{'model B':>11}")
    for r in rows:
        print(f"{r['preset']:<8}{r['data']:<26}{r['params']:>11,}{r['steps']:>6}{r['tokens_per_second']:>10,.0f}"
              f"{r['train_loss_first']:>8.3f}{r['train_loss_last']:>9.3f}{r['val_bpb_prequant']:>9.4f}"
              f"{r['val_bpb_roundtrip']:>8.4f}{r['model_bytes']:>11,}")


if __name__ == "__main__":
    main()
