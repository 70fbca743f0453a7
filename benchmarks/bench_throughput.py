"""Training throughput of each preset at a profile, against this process's own matmul rate.

The machine is shared and noisy, so absolute tokens/s mean little; the table reports the ratio of
the model's achieved FLOP rate to a large bf16/fp32 matmul measured in the same process, right
before, which is comparable across runs.

    python benchmarks/bench_throughput.py [--profile cpu] [--steps 8] [--presets baseline,pr401]

Model FLOPs per token: 6 * (matrix parameters touched per token) for forward + backward, plus the
attention scores 6 * 2 * layers * seq_len * model_dim / 2 (causal half), as in the usual MFU
accounting (Chinchilla / PaLM appendix).
"""

from __future__ import annotations

import argparse
import time

import torch

from pgolf.config import load_config
from pgolf.model.gpt import build_model
from pgolf.optim.groups import build_optimizers
from pgolf.train.setup import apply_precision, autocast_dtype


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(model, cfg) -> float:
    dense = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "tok_emb" not in n)
    dense += cfg.model.vocab_size * cfg.model.model_dim  # tied LM head matmul
    attn = 2 * cfg.model.num_layers * cfg.train.train_seq_len * cfg.model.model_dim / 2
    return 6 * dense + 6 * attn


def bench(preset: str, profile: str, steps: int) -> dict:
    cfg = load_config(preset, profile)
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    apply_precision(model, cfg.train, torch.device("cpu"))
    opts = build_optimizers(model, cfg.optim, cfg.model.tie_embeddings)
    amp = autocast_dtype(cfg.train, torch.device("cpu"))
    seqs = cfg.train.train_batch_tokens // cfg.train.train_seq_len
    x = torch.randint(0, cfg.model.vocab_size, (seqs, cfg.train.train_seq_len))
    y = torch.randint(0, cfg.model.vocab_size, (seqs, cfg.train.train_seq_len))

    def step():
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    step()  # first-call allocations
    peak = matmul_rate(amp or torch.float32)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    tok_s = cfg.train.train_batch_tokens / dt
    achieved = tok_s * flops_per_token(model, cfg)
    return {"preset": preset, "params": sum(p.numel() for p in model.parameters()), "ms_step": 1000 * dt,
            "tok_s": tok_s, "gflops": achieved / 1e9, "matmul_gflops": peak / 1e9, "ratio": achieved / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--presets", default="baseline,pr89,pr201,pr401")
    args = ap.parse_args()
    rows = [bench(p, args.profile, args.steps) for p in args.presets.split(",")]
    print(f"profile={args.profile} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'preset':<9}{'params':>11}{'ms/step':>9}{'tokens/s':>10}{'model GFLOP/s':>15}{'matmul GFLOP/s':>16}{'ratio':>7}")
    for r in rows:
        print(f"{r['preset']:<9}{r['params']:>11,}{r['ms_step']:>9.0f}{r['tok_s']:>10,.0f}{r['gflops']:>15.1f}{r['matmul_gflops']:>16.1f}{r['ratio']:>7.3f}")


if __name__ == "__main__":
    main()
