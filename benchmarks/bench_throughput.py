"""Training and evaluation throughput of the real trainer, before and after, side by side in one run.

Each row is one ``pgolf train`` in its own process (so peak memory is that run's own), on the demo
corpus, with a fixed step count and no wallclock cap; the numbers come from the run's
``metrics.jsonl``:

- ``tok_s``: training tokens/s between step 3 and the last step (the first steps pay allocations);
- ``eval_tok_s``: the round-trip evaluation's targets per second (the export/reload eval pass);
- ``mfu``: model FLOP/s over this machine's best matmul rate (the larger of fp32 and bf16, a
  1024x1024 product measured in this process right before the rows): comparable across dtypes;
- ``peak_mem_bytes``: the process's peak resident set size;
- ``compile_s_cold`` / ``compile_s_cached``: for the compiled row, the compile warm-up seconds of a
  run with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a fresh folder) and of the
  later runs with that cache filled.

Each variant runs ``--repeats`` times, interleaved with the others; the best tokens/s of its runs
is reported (the least-disturbed one on a shared machine).

``--before SRC`` adds rows for another checkout of pgolf (``git worktree add /tmp/c33cc77
c33cc77``): its code runs with ``PYTHONPATH=SRC`` on the same data, shapes and step count.

    python benchmarks/bench_throughput.py [--presets baseline,pr401] [--steps 24] [--repeats 2] [--before SRC] [--json]

Model FLOPs per token: 6 x (matrix parameters touched per token, the tied head included) for
forward + backward, plus the causal attention scores 6 x layers x seq_len x model_dim (PaLM
appendix B accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(preset: str, profile: str) -> float:
    from pgolf.config import load_config
    from pgolf.model.gpt import build_model

    cfg = load_config(preset, profile)
    model = build_model(cfg.model, "meta")
    dense = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "tok_emb" not in n)
    dense += cfg.model.vocab_size * cfg.model.model_dim  # tied LM head matmul
    attn = cfg.model.num_layers * cfg.train.train_seq_len * cfg.model.model_dim
    return 6 * dense + 6 * attn


def child(spec: dict) -> None:
    """Runs inside the row's process: one training run, then one JSON line of its numbers."""
    import pgolf
    from pgolf.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = [f"train.iterations={spec['steps']}", "train.max_wallclock_seconds=0", "train.train_log_every=1",
                f"eval.max_val_tokens={spec['val_tokens']}", "train.progress=false", *spec["sets"]]
        argv = ["train", "--preset", spec["preset"], "--profile", spec["profile"], "--data", spec["data"], "--out", str(out)]
        for s in sets:
            argv += ["--set", s]
        rc = main(argv)
        assert rc == 0, f"pgolf train exited {rc}"
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    summary = next(e for e in events if e["event"] == "summary")
    first = train[min(2, len(train) - 2)]
    last = train[-1]
    tok_s = (last["tokens"] - first["tokens"]) / ((last["train_time_ms"] - first["train_time_ms"]) / 1000)
    print("ROW " + json.dumps({
        "pgolf": str(Path(pgolf.__file__).parent.parent),
        "tok_s": tok_s,
        "eval_tok_s": summary["val_targets_roundtrip"] / summary["eval_seconds_roundtrip"],
        "compile_s": summary.get("compile_warmup_seconds", 0.0),
        "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_train_loss": summary["final_train_loss"],
    }), flush=True)


def run_row(spec: dict, src: Path, cache_dir: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env,
                          cwd=tempfile.gettempdir(), capture_output=True, text=True)
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"row {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(rows[-1])
    if Path(row["pgolf"]).resolve() != src.resolve():
        raise SystemExit(f"row ran pgolf from {row['pgolf']}, not {src}")
    return row


def bench(args: argparse.Namespace) -> list[dict]:
    from pgolf.data.demo import prepare_demo

    data = str(args.data or prepare_demo(progress=False))
    variants = []  # (label, src, extra --set, compiled)
    if args.before:
        variants.append(("before", Path(args.before), [], False))
    variants.append(("after", REPO, [], False))
    if args.compile:
        variants.append(("after+compile", REPO, ["train.compile=on", "train.warmup_steps=2"], True))
    peak = max(matmul_rate(torch.float32), matmul_rate(torch.bfloat16))
    rows = []
    for preset in args.presets.split(","):
        fpt = flops_per_token(preset, args.profile)
        best: dict[str, dict] = {}
        colds: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as cache:
            # Variants interleaved, each repeated: on a shared machine the best of the repeats is
            # the least-disturbed measurement of each, and interleaving spreads slow periods.
            for rep in range(args.repeats):
                for label, src, sets, compiled in variants:
                    spec = {"preset": preset, "profile": args.profile, "steps": args.steps,
                            "val_tokens": args.val_tokens, "data": data, "sets": sets}
                    if compiled and rep == 0:
                        colds[label] = run_row(spec, src, Path(cache))["compile_s"]  # empty cache: cold
                    row = run_row(spec, src, Path(cache) if compiled else None)
                    prev = best.get(label)
                    best[label] = row if prev is None else {
                        **prev, "tok_s": max(prev["tok_s"], row["tok_s"]), "eval_tok_s": max(prev["eval_tok_s"], row["eval_tok_s"]),
                        "compile_s": min(prev["compile_s"], row["compile_s"]), "peak_mem_bytes": max(prev["peak_mem_bytes"], row["peak_mem_bytes"])}
        for label, src, _, compiled in variants:
            row = best[label]
            rows.append({"preset": preset, "code": label, "src": str(src), "steps": args.steps, "repeats": args.repeats,
                         "tok_s": row["tok_s"], "eval_tok_s": row["eval_tok_s"], "mfu": row["tok_s"] * fpt / peak,
                         "peak_mem_bytes": row["peak_mem_bytes"], "compile_s_cold": colds.get(label),
                         "compile_s_cached": row["compile_s"] if compiled else None,
                         "final_train_loss": row["final_train_loss"], "matmul_gflops": peak / 1e9})
    for r in rows:  # speed-up against the first row of the same preset (the "before" one when given)
        ref = next(x for x in rows if x["preset"] == r["preset"])
        r["tok_s_ratio"] = r["tok_s"] / ref["tok_s"]
        r["eval_tok_s_ratio"] = r["eval_tok_s"] / ref["eval_tok_s"]
    return rows


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--val-tokens", type=int, default=131072, help="validation prefix of the round-trip eval")
    ap.add_argument("--presets", default="baseline,pr401")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (interleaved); the best is reported")
    ap.add_argument("--data", default=None, help="data folder (default: the demo corpus)")
    ap.add_argument("--before", default=None, help="another pgolf checkout to measure side by side")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    rows = bench(args)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"profile={args.profile} steps={args.steps} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"matmul={rows[0]['matmul_gflops']:.1f} GFLOP/s (best of fp32/bf16)")
    print(f"{'preset':<9}{'code':<15}{'tokens/s':>10}{'x':>6}{'eval tok/s':>12}{'x':>6}{'mfu':>7}{'peak MiB':>10}"
          f"{'compile cold s':>16}{'cached s':>10}{'loss@end':>10}")
    for r in rows:
        print(f"{r['preset']:<9}{r['code']:<15}{r['tok_s']:>10,.0f}{r['tok_s_ratio']:>6.2f}{r['eval_tok_s']:>12,.0f}"
              f"{r['eval_tok_s_ratio']:>6.2f}{r['mfu']:>7.3f}{r['peak_mem_bytes'] / 2**20:>10,.0f}"
              f"{_opt(r['compile_s_cold'], '.1f'):>16}{_opt(r['compile_s_cached'], '.1f'):>10}{r['final_train_loss']:>10.4f}")


if __name__ == "__main__":
    main()
