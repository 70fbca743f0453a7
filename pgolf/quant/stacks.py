"""Role stacks: one range-coded stream for the same matrix of every block (R7's grouping by role).

A range coder pays to learn each tensor's statistics: the order-0 coder stores a frequency table
per context (~40 bytes for an int6 tensor), the context coder starts every tensor from a prior and
learns its bit probabilities and mixer weights again. The eleven ``attn.c_q`` of a model share
their statistics closely, so R7 compresses each role's matrices as one group. pgolf does the same
when it pays: the integers of ``blocks.0.<role>``, ``blocks.1.<role>``, ... (same format, same
number of columns) are stacked row-wise, in the artifact's tensor order, and coded as one stream
with the packing their members chose (the order-0 coder is tried as well), and the stack is kept
only if it is smaller than the members' own streams together. Measured on the pr1855 cpu run:
the attention roles lose 1.9 KB of tables (order-0 stacks) and the eleven ``mlp.fc`` 1.0 KB of
learning (a context-coded stack); the ``mlp.proj`` stack is larger (their column statistics
differ between layers) and is not kept.

Every member's ``v`` stream entry in the header points at the stack's bytes and carries two more
numbers, its first row in the stack and the stack's rows; the decoder decodes a stack once and
gives each member its rows. Decoding a stack checks what decoding a stream checks, plus that the
member's rows lie inside the stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_BLOCK_ROLE = re.compile(r"^blocks\.(\d+)\.(.+)$")
STACKABLE = ("entropy", "ctx")


def role_of(name: str) -> str | None:
    """``attn.c_q.weight`` for ``blocks.3.attn.c_q.weight``; None outside the blocks."""
    m = _BLOCK_ROLE.match(name)
    return m.group(2) if m else None


@dataclass
class StackPlan:
    members: list[int]  # indices into the caller's list, in artifact order
    packing: str
    data: bytes
    rows: list[int]  # each member's rows


def plan_stacks(items: list[tuple[str, str, torch.Tensor, str, int]], encode) -> list[StackPlan]:
    """``items``: (tensor name, format, integers q [R, C], chosen packing, stream bytes) of the
    integer tensors; ``encode(q, fmt, packing)`` codes a stack. Returns the stacks worth keeping."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, (name, fmt, q, packing, _) in enumerate(items):
        role = role_of(name)
        if role is not None and packing in STACKABLE and q.dim() == 2:
            groups.setdefault((role, fmt, q.shape[1]), []).append(i)
    plans = []
    for members in groups.values():
        if len(members) < 2:
            continue
        own = sum(items[i][4] for i in members)
        stacked = torch.cat([items[i][2] for i in members], dim=0)
        # a stack decodes with one coder: ctx only where every member chose it (so that the
        # context coder's decode budget is unchanged)
        packings = ["entropy"] + (["ctx"] if all(items[i][3] == "ctx" for i in members) else [])
        trials = {p: encode(stacked, items[members[0]][1], p) for p in packings}
        packing = min(trials, key=lambda p: len(trials[p]))
        if len(trials[packing]) < own:
            plans.append(StackPlan(members, packing, trials[packing], [items[i][2].shape[0] for i in members]))
    return plans


class StackCache:
    """Decoded stacks of one artifact, keyed by where their bytes are and how they are coded."""

    def __init__(self) -> None:
        self._decoded: dict[tuple, torch.Tensor] = {}

    def rows(self, key: tuple, first: int, count: int, decode) -> torch.Tensor:
        """Rows first..first+count of the stack ``key`` (decoded by ``decode()`` on first use)."""
        if key not in self._decoded:
            self._decoded[key] = decode()
        stack = self._decoded[key]
        if first + count > stack.shape[0]:
            raise ValueError(f"rows {first}..{first + count} lie outside the stack's {stack.shape[0]} rows")
        return stack[first : first + count]
