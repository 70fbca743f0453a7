"""``pgolf doctor``: what this machine offers (torch, CUDA, GPUs, NCCL/gloo, FlashAttention,
Triton, torch.compile, CPUs, lrzip) and what a preset/profile will use on it (device, attention
kernel, compile, autocast, distributed backend), one ``key: value`` line each, or one JSON object.

The run's choices come from the functions the training run itself calls
(``pgolf.train.distributed``, ``pgolf.train.setup``, ``pgolf.model.attention``)."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys

from pgolf.cli.common import add_config_args, config_from_args, print_json

# A tiny function compiled with inductor in a child process (a crash or hang cannot take doctor down).
_COMPILE_PROBE = """
import torch
def f(x):
    return torch.nn.functional.gelu(x) * 2 + x.sin()
g = torch.compile(f, backend="inductor", fullgraph=True, dynamic=False)
x = torch.randn(64)
torch.testing.assert_close(g(x), f(x))
print("ok")
"""


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine offers and what a preset will use on it")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compile-timeout", type=float, default=180.0, metavar="S",
                   help="seconds allowed for the torch.compile probe (default 180)")
    p.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile probe")
    p.set_defaults(func=run)


def _module_version(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return True, str(getattr(mod, "__version__", "importable"))


def compile_probe(timeout: float) -> tuple[bool, str]:
    """(usable, detail): compile a tiny function with inductor on CPU in a subprocess."""
    try:
        res = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    if res.returncode == 0 and res.stdout.strip().endswith("ok"):
        return True, "inductor compiled a test function on CPU"
    lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit code {res.returncode}"


def machine_report(check_compile: bool = True, compile_timeout: float = 180.0) -> dict:
    import torch
    import torch.distributed as dist

    out: dict = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "torch_debug_build": bool(torch.version.debug),
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpus": [],
    }
    if out["cuda_available"]:
        for i in range(out["gpu_count"]):
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": props.name, "memory_bytes": int(props.total_memory),
                                "capability": f"{props.major}.{props.minor}"})
    out["distributed_available"] = dist.is_available()
    out["nccl_available"] = bool(dist.is_available() and dist.is_nccl_available())
    out["gloo_available"] = bool(dist.is_available() and dist.is_gloo_available())
    out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version())) if out["nccl_available"] and out["cuda_available"] else None
    ok, detail = _module_version("flash_attn_interface")
    out["flash_attention_3"] = ok
    out["flash_attention_3_detail"] = detail
    ok, detail = _module_version("flash_attn")
    out["flash_attn"] = ok
    out["flash_attn_detail"] = detail
    ok, detail = _module_version("triton")
    out["triton"] = ok
    out["triton_version"] = detail if ok else None
    if not ok:
        out["triton_detail"] = detail
    if check_compile:
        ok, detail = compile_probe(compile_timeout)
        out["torch_compile"] = ok
        out["torch_compile_detail"] = detail
    else:
        out["torch_compile"] = None
        out["torch_compile_detail"] = "not checked (--no-compile-check)"
    out["cpu_count"] = os.cpu_count()
    out["cpu_affinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out["torch_threads"] = torch.get_num_threads()
    out["lrzip"] = shutil.which("lrzip")
    return out


def run_report(cfg) -> dict:
    """What ``pgolf train`` with this config would choose on this machine."""
    import torch

    from pgolf.errors import UserError
    from pgolf.model.attention import _import_varlen, resolve_attention_kernel
    from pgolf.train.distributed import process_group_backend, resolve_device
    from pgolf.train.setup import autocast_dtype, autocast_reason, use_compile

    out: dict = {"preset": cfg.preset, "profile": cfg.profile}
    try:
        device = resolve_device(cfg.train.device)
        out["device"] = str(device)
        out["device_error"] = None
    except UserError as exc:
        # The config asks for CUDA here without it: report what it would need, and the CPU fallback.
        out["device"] = "unavailable"
        out["device_error"] = str(exc)
        device = torch.device("cuda") if cfg.train.device == "cuda" else torch.device("cpu")
    m = cfg.model
    try:
        kernel = resolve_attention_kernel(m.attention_backend, device)
        attn = {"sdpa_attention": "sdpa", "flash3_attention": "flash3"}.get(kernel.__name__, kernel.__name__)
        if m.doc_attention_window > 0:
            varlen = m.attention_backend != "sdpa" and device.type == "cuda" and _import_varlen() is not None
            attn = ("flash varlen (document-masked)" if varlen
                    else "pytorch document masking (pieces eager, block masks compiled)")
        out["attention_backend"] = attn
    except UserError as exc:
        out["attention_backend"] = f"unavailable: {exc}"
    out["attention_backend_setting"] = m.attention_backend
    out["compile"] = use_compile(cfg.train, device)
    dtype = autocast_dtype(cfg.train, device)
    out["autocast"] = str(dtype).replace("torch.", "") if dtype is not None else "off"
    out["autocast_reason"] = autocast_reason(cfg.train, device)
    out["distributed_backend"] = process_group_backend(device) + " (under torchrun; one process otherwise)"
    return out


def run(args: argparse.Namespace) -> int:
    if args.compile_timeout <= 0:
        from pgolf.errors import UserError

        raise UserError(f"--compile-timeout must be > 0, got {args.compile_timeout:g}")
    cfg = config_from_args(args)
    machine = machine_report(not args.no_compile_check, args.compile_timeout)
    rep = {"machine": machine, "run": run_report(cfg)}
    if args.json:
        print_json(rep)
        return 0
    for section, values in rep.items():
        for key, value in values.items():
            if key == "gpus":
                for i, g in enumerate(value):
                    print(f"{section}.gpu{i}: {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, sm {g['capability']}")
                continue
            print(f"{section}.{key}: {'none' if value is None else value}")
    return 0
