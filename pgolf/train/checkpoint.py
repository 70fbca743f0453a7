"""Checkpoints that resume a run exactly, in pgolf's container format (never pickle).

Layout inside a run folder::

    checkpoints/step_000040/rank0.pgolf   one file per rank (optimizer states can be rank-local:
    checkpoints/step_000040/rank1.pgolf   round-robin and sharded Muon keep momentum for their part)
    checkpoints/step_000040/COMPLETE      written by rank 0 after every rank's file is in place

Each rank file is written to a temp name and renamed (``write_bytes_atomic``), and ``COMPLETE``
(JSON: step, world size, sha256 of every rank file) is written last, so a folder without it, or
whose files do not match it, is an incomplete checkpoint and is ignored by ``--resume``. A failed
write (a full disk) leaves the previous checkpoints untouched; the oldest complete ones beyond
``keep`` are removed only after a new one is complete.

A state is a tree of dicts, lists, numbers, strings and tensors. Tensors are stored as raw
container tensors; everything else goes into the container's JSON header, with dict keys kept
with their type (optimizer states are keyed by int).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pgolf.errors import UserError

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
FORMAT = "pgolf-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """No usable checkpoint, or one that belongs to another configuration or world size."""


# ------------------------------------------------------------------------------------------------
# state tree <-> (JSON skeleton, named tensors)


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}:{path}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path}: cannot store {type(obj).__name__}")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, dict) and "__list__" in node:
        items = [_unflatten(v, tensors) for v in node["__list__"]]
        return tuple(items) if node.get("tuple") else items
    return node


def encode_state(state: dict[str, Any]) -> bytes:
    from pgolf.quant.container import ChunkPlan, encode_artifact
    from pgolf.quant.export import QTensor, dtype_name

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "state", tensors)
    qts = [QTensor(name, tuple(t.shape), dtype_name(t.dtype), "raw", t) for name, t in tensors.items()]
    meta = {"format": FORMAT, "version": VERSION, "skeleton": skeleton}
    return encode_artifact(qts, meta, ChunkPlan(default_codec="none"))


def decode_state(path: Path) -> dict[str, Any]:
    from pgolf.quant.container import read_artifact

    meta, qts = read_artifact(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a pgolf checkpoint of version {VERSION}")
    return _unflatten(meta["skeleton"], {q.name: q.values.reshape(q.shape) for q in qts})


# ------------------------------------------------------------------------------------------------
# files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:06d}"


def write_rank_file(run_dir: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    from pgolf.quant.container import write_bytes_atomic

    folder = step_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.pgolf"
    write_bytes_atomic(path, encode_state(state))
    return path


def mark_complete(run_dir: Path, step: int, world_size: int, config_hash: str, keep: int = 2) -> None:
    """Rank 0, after every rank's file is written: the completion marker, then old checkpoints go."""
    from pgolf.quant.container import write_bytes_atomic

    folder = step_dir(run_dir, step)
    files = {f"rank{r}.pgolf": _sha256(folder / f"rank{r}.pgolf") for r in range(world_size)}
    marker = {"step": step, "world_size": world_size, "config_hash": config_hash, "files": files}
    write_bytes_atomic(folder / COMPLETE, (json.dumps(marker, indent=1) + "\n").encode())
    complete = [c for c in list_checkpoints(run_dir) if c.complete]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    marker: dict | None


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / COMPLETE).read_text())
        for name, digest in marker["files"].items():
            if _sha256(folder / name) != digest:
                return None
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Every checkpoint folder of a run, oldest first, with whether it is complete and intact."""
    root = run_dir / CHECKPOINT_DIR
    out = []
    for folder in sorted(root.glob("step_*")) if root.is_dir() else []:
        try:
            step = int(folder.name.removeprefix("step_"))
        except ValueError:
            continue
        marker = _read_marker(folder)
        out.append(CheckpointInfo(folder, step, marker is not None, marker))
    return out


def latest_complete(run_dir: Path, *, config_hash: str, world_size: int) -> CheckpointInfo:
    """The newest complete checkpoint; a clear error when there is none or it does not fit."""
    found = list_checkpoints(run_dir)
    complete = [c for c in found if c.complete]
    if not complete:
        extra = f" ({len(found)} incomplete ignored)" if found else ""
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from{extra}; "
                              "train with --checkpoint-every N, or stop a run with Ctrl-C / SIGTERM to leave one")
    best = complete[-1]
    if best.marker["config_hash"] != config_hash:
        raise CheckpointError(f"{best.path}: this checkpoint was written by another configuration "
                              f"(hash {best.marker['config_hash']} vs {config_hash}); resume without --set/--preset changes")
    if best.marker["world_size"] != world_size:
        raise CheckpointError(f"{best.path}: written by {best.marker['world_size']} process(es) but this run has "
                              f"{world_size}; resume with --nproc_per_node={best.marker['world_size']}")
    return best


def config_hash(config: dict) -> str:
    """Hash of everything that changes the computation; progress bars and logging cadence aside."""
    cfg = json.loads(json.dumps(config, default=str))
    for key in ("progress", "train_log_every", "threads"):
        cfg.get("train", {}).pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
