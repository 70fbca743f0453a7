"""Device-dependent choices, made once: precision, autocast, compile, kernels.

CUDA follows the submissions: the model is cast to bf16, every ``CastedLinear`` back to fp32
(fp32 master weights, bf16 matmuls under autocast), every parameter with ndim < 2 or a control
name back to fp32; embedding tables stay bf16. TF32 is on, the forward is compiled with
``fullgraph=True, dynamic=False`` and the Newton-Schulz function is compiled separately.
CPU runs without compile by default, and under bf16 autocast only where the processor multiplies
bf16 natively (AMX or AVX512-BF16): elsewhere oneDNN emulates bf16 and a bf16 matmul runs at about
0.3x the fp32 rate (measured by ``benchmarks/bench_throughput.py``), so ``autocast = "auto"`` keeps
fp32 there. Both are switchable in ``[train]``.
"""

from __future__ import annotations

import torch
from torch import nn

from pgolf.model.config import is_control_tensor
from pgolf.model.layers import CastedLinear
from pgolf.train.config import TrainConfig


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of hardware bf16 dot products


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has hardware bf16 matmul instructions (Linux ``/proc/cpuinfo`` flags; False
    where they cannot be read, which keeps fp32: the safe choice, never the slow one by more than
    the bf16 speed-up)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when asked; under ``auto`` on CUDA and on CPUs with native bf16, otherwise None (fp32)."""
    if cfg.autocast == "bf16":
        return torch.bfloat16
    if cfg.autocast == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_native_bf16())):
        return torch.bfloat16
    return None


def autocast_reason(cfg: TrainConfig, device: torch.device) -> str:
    """One line saying why :func:`autocast_dtype` chose what it chose (for the run log and doctor)."""
    if cfg.autocast != "auto":
        return f"train.autocast={cfg.autocast}"
    if device.type == "cuda":
        return "auto: CUDA"
    if cpu_native_bf16():
        return "auto: this CPU has native bf16 matmuls"
    return f"auto: this CPU has no native bf16 matmul ({'/'.join(NATIVE_BF16_FLAGS)} absent), fp32 is faster"


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def apply_precision(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """bf16 embedding tables on CUDA (as the scripts), fp32 for everything else."""
    embed_bf16 = cfg.embed_dtype == "bf16" or (cfg.embed_dtype == "auto" and device.type == "cuda")
    if not embed_bf16:
        model.float()
        return
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim < 2 or is_control_tensor(name)) and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in model.named_buffers():
            if b.is_floating_point() and b.dtype != torch.float32:
                b.data = b.data.float()


def configure_backends(device: torch.device, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def persistent_compile_cache() -> str:
    """Point inductor's on-disk caches (FX graph, AOTAutograd, autotuning) at ``$PGOLF_CACHE/inductor``
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set: inductor's default under ``/tmp`` is lost with the
    machine's temporary files, and a run whose graphs are cached compiles in seconds instead of
    minutes (``benchmarks/bench_throughput.py`` measures both). Returns the folder in use."""
    import os

    from pgolf.data.demo import cache_root

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    persistent_compile_cache()
    from pgolf.optim import newton_schulz

    newton_schulz.set_newton_schulz_impl(torch.compile(newton_schulz.newton_schulz5), "standard")
    newton_schulz.set_newton_schulz_impl(torch.compile(newton_schulz.polar_express), "polar_express")
    return torch.compile(model, dynamic=False, fullgraph=True)
