"""``pgolf inspect --artifact``: what an artifact stores, tensor by tensor, against the budget.

Per tensor: format, packing and codec (the export's recorded choice), stored bytes and bits per
weight after compression, and for integer formats the Shannon bound of the integer symbols:

* ``bound_order0_bytes``: order-0 entropy with one distribution per tensor;
* ``bound_bytes``: order-0 entropy under the statistics the coder used: per row-group x
  column-group context for range-coded tensors (``contexts`` = "KrxKc"), per tensor otherwise
  (a byte codec has no finer statistics to credit). The context coder (packing ``ctx``,
  ``contexts`` = "ctx") conditions on the previous row and can code below this order-0 bound,
  which is the point of it.

Bytes of a chunk shared by several streams (the small "misc" chunk, or the one chunk of a fixed
codec) are attributed to its streams in proportion to their uncompressed sizes; every other
stream's bytes are exact. Totals are exact: ``model_bytes`` is the file size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.quant.container import CONTAINER_VERSION, read_artifact_contents
from pgolf.quant.entropy import stream_stats, tensor_bound_bits
from pgolf.quant.formats import parse_format


def artifact_report(path: str | Path, *, codecs: str = "none") -> dict:
    """The report of an artifact; ``codecs``: ``all`` adds the codecs table of
    ``pgolf.quant.compare`` (brotli and, when installed, lrzip take a while on a full model),
    ``fast`` the table without the lrzip scheme, ``none`` no table."""
    contents = read_artifact_contents(path, keep_payload=True)
    meta = contents.meta
    rows_out = []
    tot = {"int_params": 0, "int_payload_bytes": 0.0, "scale_bytes": 0.0, "float_params": 0, "float_bytes": 0.0,
           "bound_bytes": 0.0, "bound_order0_bytes": 0.0}
    for qt, info in zip(contents.qtensors, contents.tensors):
        v = info.streams["v"]
        s = info.streams.get("s")
        row = {
            "name": qt.name,
            "shape": list(qt.shape),
            "fmt": qt.fmt,
            "packing": v.packing,
            "codec": v.codec,
            "stored_bytes": round(v.stored_bytes + (s.stored_bytes if s else 0.0), 1),
            "bits_per_weight": 8.0 * (v.stored_bytes + (s.stored_bytes if s else 0.0)) / max(qt.numel, 1),
        }
        if s is not None:
            bits = parse_format(qt.fmt).bits
            u = (qt.values.numpy().astype(np.int16) - parse_format(qt.fmt).qmin).astype(np.uint8).reshape(qt.values.shape[0], -1)
            order0 = tensor_bound_bits(u, bits) / 8
            if v.stack is not None:  # a role stack's rows: the stack's statistics are shared
                bound, contexts, model_bytes = order0, f"stack of {v.stack[1]} rows ({v.packing})", None
            elif v.packing == "entropy":
                st = stream_stats(v.payload, u, bits)
                bound, contexts, model_bytes = st["bound_bits"] / 8, st["contexts"], st["model_bytes"]
            elif v.packing == "ctx":  # adaptive contexts of the previous row: may code below the order-0 bound
                bound, contexts, model_bytes = order0, "ctx", None
            else:
                bound, contexts, model_bytes = order0, "tensor", None
            row.update(
                payload_bytes=round(v.stored_bytes, 1),
                scale_bytes=round(s.stored_bytes, 1),
                payload_bits_per_weight=8.0 * v.stored_bytes / max(qt.numel, 1),
                bound_bytes=round(bound, 1),
                bound_order0_bytes=round(order0, 1),
                bound_bits_per_weight=8.0 * bound / max(qt.numel, 1),
                contexts=contexts,
                coder_model_bytes=model_bytes,
            )
            tot["int_params"] += qt.numel
            tot["int_payload_bytes"] += v.stored_bytes
            tot["scale_bytes"] += s.stored_bytes
            tot["bound_bytes"] += bound
            tot["bound_order0_bytes"] += order0
        else:
            tot["float_params"] += qt.numel
            tot["float_bytes"] += v.stored_bytes
        rows_out.append(row)
    model_bytes = contents.file_bytes
    code_bytes = meta.get("code_bytes")
    budget = meta.get("budget_bytes", 16_000_000)
    params = tot["int_params"] + tot["float_params"]
    totals = {
        "model_bytes": model_bytes,
        "entropy_bound_bytes": round(tot["bound_bytes"]),
        "entropy_bound_order0_bytes": round(tot["bound_order0_bytes"]),
        "int_payload_bytes": round(tot["int_payload_bytes"]),
        "payload_over_bound": tot["int_payload_bytes"] / tot["bound_bytes"] if tot["bound_bytes"] else None,
        "scale_bytes": round(tot["scale_bytes"]),
        "float_bytes": round(tot["float_bytes"]),
        "header_bytes": contents.header_bytes,
        "params": params,
        "int_params": tot["int_params"],
        "bits_per_weight": 8.0 * model_bytes / max(params, 1),
        "code_bytes": code_bytes,
        "artifact_bytes": model_bytes + code_bytes if code_bytes is not None else None,
        "budget_bytes": budget,
        "fits": (model_bytes + code_bytes) <= budget if code_bytes is not None else model_bytes <= budget,
        "headroom_bytes": budget - model_bytes - (code_bytes or 0),
    }
    extra = {}
    if codecs != "none":
        from pgolf.quant.compare import codec_comparison

        value_bytes = {qt.name: info.streams["v"].stored_bytes for qt, info in zip(contents.qtensors, contents.tensors)}
        extra = codec_comparison(contents.qtensors, model_bytes, value_bytes, lrzip=codecs == "all")
    return {
        **extra,
        "path": str(path),
        "container_version": CONTAINER_VERSION,
        "header_codec": contents.header_codec,
        "chunks": [{"codec": c, "raw_bytes": r, "bytes": n} for c, r, n in contents.chunks],
        "preset": meta.get("preset"),
        "profile": meta.get("profile"),
        "gptq": meta.get("gptq"),
        "bound_statistics": "order-0; per row-group x column-group context for range-coded tensors, per tensor otherwise",
        "tensors": rows_out,
        "totals": totals,
    }


def format_artifact_report(rep: dict) -> str:
    lines = [f"artifact {rep['path']} (container v{rep['container_version']}, preset {rep['preset']}, profile {rep['profile']})"]
    lines.append(f"{'tensor':<34} {'format':<14} {'packing':<8} {'codec':<8} {'bytes':>10} {'bits/w':>7} {'bound b/w':>9} {'ctx':>5}")
    for r in rep["tensors"]:
        bound = f"{r['bound_bits_per_weight']:.3f}" if "bound_bytes" in r else "-"
        lines.append(
            f"{r['name'][:34]:<34} {r['fmt']:<14} {r['packing']:<8} {r['codec']:<8} {r['stored_bytes']:>10,.0f} "
            f"{r['bits_per_weight']:>7.3f} {bound:>9} {r.get('contexts', '-'):>5}"
        )
    t = rep["totals"]
    ratio = f"{t['payload_over_bound']:.4f}" if t["payload_over_bound"] else "-"
    lines.append(
        f"integer payload {t['int_payload_bytes']:,} B vs entropy bound {t['entropy_bound_bytes']:,} B "
        f"(ratio {ratio}; order-0 per-tensor bound {t['entropy_bound_order0_bytes']:,} B); scales {t['scale_bytes']:,} B, "
        f"float tensors {t['float_bytes']:,} B, header {t['header_bytes']:,} B"
    )
    code = f"{t['code_bytes']:,}" if t["code_bytes"] is not None else "unknown"
    total = f"{t['artifact_bytes']:,}" if t["artifact_bytes"] is not None else "unknown"
    lines.append(
        f"model {t['model_bytes']:,} B ({t['bits_per_weight']:.3f} bits/param over {t['params']:,} params) + code {code} B "
        f"= {total} B of {t['budget_bytes']:,} B: {'fits' if t['fits'] else 'OVER BUDGET'} (headroom {t['headroom_bytes']:,} B)"
    )
    lines.append(f"bound statistics: {rep['bound_statistics']}")
    if "codecs" in rep:
        lines.append(format_codecs(rep))
    return "\n".join(lines)


def format_codecs(rep: dict) -> str:
    """The codecs table (bytes per scheme, per group and in total)."""
    from pgolf.quant.compare import CODEC_KEYS

    def cell(v) -> str:
        return f"{v:>17,}" if v is not None else f"{'-':>17}"

    lines = [f"{'group':<12} {'values':>11} " + " ".join(f"{k:>17}" for k in CODEC_KEYS)]
    for r in rep["codec_groups"]:
        values = f"{r['values']:>11,}" if r["values"] is not None else f"{'':>11}"
        lines.append(f"{r['group']:<12} {values} " + " ".join(cell(r[k]) for k in CODEC_KEYS))
    c = rep["codecs"]
    lines.append(f"{'model':<12} {'':>11} " + " ".join(cell(c[k]) for k in CODEC_KEYS))
    ratios = [f"pgolf / {k} = {c['pgolf'] / c[k]:.4f}" for k in ("zstd-22", "brotli-11-shuffle", "lrzip-pergroup", "entropy_bound") if c.get(k)]
    lines.append("; ".join(ratios))
    if rep.get("lrzip_note"):
        lines.append(f"lrzip-pergroup: {rep['lrzip_note']}")
    return "\n".join(lines)
