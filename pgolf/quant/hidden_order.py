"""MLP hidden units stored in a compressible order (``quant.hidden_order = "greedy"``).

R7 reorders the rows of its "hot" matrices by greedy L1 nearest neighbour so that ZPAQ sees similar
rows next to each other, and pays for it: every permutation is stored (log2 R! bits at best). For
an MLP ``proj(act(fc(x)))`` with an elementwise ``act``, the order of the hidden units is a
symmetry of the model: permuting the rows of ``fc`` and the columns of ``proj`` by the same
permutation computes the same function. So the rows of every ``fc`` can be put in the greedy
nearest-neighbour order for nothing: the artifact simply holds the permuted model, no permutation
is stored, and the context coder (``ctxcoder.py``) finds each row next to a similar one.

Applied to the quantised integers after quantisation (GPTQ's result permuted, not recomputed), so
the stored model is the quantised model with its hidden units relabelled: the same outputs up to
the order of the float sums over the hidden dimension. A layer is left as it is when that would
not be exact: ``fc`` or ``proj`` not an integer format, any other tensor under the same ``mlp.``
prefix (gated MLP variants carry per-unit weights), an LQER correction on ``proj`` (its B factor's
group scales run along the hidden dimension) or a rotated ``proj`` (``quant.rotate`` mixes the
hidden columns).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pgolf.quant.export import QTensor
from pgolf.quant.formats import parse_format

FC, PROJ = "fc.weight", "proj.weight"


def _greedy_rows(q: torch.Tensor, qmin: int) -> torch.Tensor:
    from pgolf.quant.ctxcoder import greedy_l1_order

    return torch.from_numpy(greedy_l1_order((q.to(torch.int16) - qmin).numpy().astype("uint8")))


def reorderable(by_name: dict[str, QTensor], prefix: str) -> bool:
    """Whether the MLP at ``prefix`` (``blocks.N.mlp.``) can be relabelled exactly."""
    fc, proj = by_name.get(prefix + FC), by_name.get(prefix + PROJ)
    if fc is None or proj is None or fc.scale is None or proj.scale is None:
        return False
    if len(fc.shape) != 2 or len(proj.shape) != 2 or fc.shape[0] != proj.shape[1] or fc.shape[0] < 3:
        return False
    if any(n.startswith(prefix) and n not in (prefix + FC, prefix + PROJ) for n in by_name):
        return False
    return proj.lqer is None and proj.rotation is None


def order_mlp_hidden(qtensors: list[QTensor]) -> tuple[list[QTensor], list[str]]:
    """The quantised tensors with every reorderable MLP's hidden units in the greedy L1 order of
    its ``fc`` rows (new QTensor objects; the inputs are not changed), and the prefixes changed."""
    by_name = {qt.name: qt for qt in qtensors}
    replaced: dict[str, QTensor] = {}
    done = []
    for prefix in sorted({n[: -len(FC)] for n in by_name if n.endswith(".mlp." + FC)}):
        if not reorderable(by_name, prefix):
            continue
        fc, proj = by_name[prefix + FC], by_name[prefix + PROJ]
        order = _greedy_rows(fc.values, parse_format(fc.fmt).qmin)
        lqer = fc.lqer
        if lqer is not None:  # A's rows follow the hidden units; sym A has a scale per row
            lqer = replace(lqer, qa=lqer.qa[order], sa=lqer.sa[order] if lqer.mode == "sym" else lqer.sa)
        replaced[fc.name] = replace(fc, values=fc.values[order].contiguous(), scale=fc.scale[order].contiguous(), lqer=lqer)
        replaced[proj.name] = replace(proj, values=proj.values[:, order].contiguous())
        done.append(prefix)
    return [replaced.get(qt.name, qt) for qt in qtensors], done
