"""Causal self-attention with GQA, QK RMS-norm, (partial) RoPE, q_gain, optional XSA and an
optional value-embedding input. Optional parts are imported only when a config uses them, so
a generated submission file carries only the techniques its preset needs.

The attention kernel is chosen once at build time (``resolve_attention_kernel``): FlashAttention 3
(``flash_attn_interface``) when asked for or available on a Hopper GPU, otherwise PyTorch SDPA,
which runs on CPU and every GPU. Both take and return [B, T, H, D].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.layers import CastedLinear, Passthrough, Rotary

AttentionKernel = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention via F.scaled_dot_product_attention; q [B,T,H,D], k/v [B,T,Hkv,D]."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.size(2) != q.size(2),
    )
    return y.transpose(1, 2)


def resolve_attention_kernel(backend: str, device: torch.device | str | None = None) -> AttentionKernel:
    """``auto`` picks FA3 only on a CUDA device with ``flash_attn_interface`` importable."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "sdpa" or (backend == "auto" and dev.type != "cuda"):
        return sdpa_attention
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        if backend == "flash3":
            from pgolf.errors import MissingDependencyError

            raise MissingDependencyError(
                "model.attention_backend=flash3 needs FlashAttention 3 (module flash_attn_interface); "
                "install it or set model.attention_backend=sdpa"
            ) from None
        return sdpa_attention

    def flash3_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return flash3_attention


def unmixed_values(attn: nn.Module, v: Tensor) -> Tensor:
    """The value mix when value residual learning is off (see ``pgolf.model.value_residual``)."""
    return v


def ungated(attn: nn.Module, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    """The attention output gate when none is configured (see ``pgolf.model.gates``)."""
    return y


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        rope_dims: int,
        rope_base: float,
        qk_gain_init: float,
        *,
        xsa: bool = False,
        kernel: AttentionKernel = sdpa_attention,
        rope_ntk_train_len: int = 0,
        out_gate: str = "none",
        gate_window: int = 12,
        gate_src: str = "proj",
        gate_scale: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(rope_dims, rope_base, rope_ntk_train_len)
        self.xsa: nn.Module = Passthrough()
        if xsa:
            from pgolf.model.xsa import ExclusiveSelfAttention

            self.xsa = ExclusiveSelfAttention()
        self.kernel = kernel
        self.value_mix = unmixed_values  # GPT attaches value residual learning (VRL) when configured
        # A plain function chosen here (not a branch in forward); the parameters sit on this module.
        self.output_gate = ungated
        if out_gate != "none":
            from pgolf.model.gates import GATE_FUNCTIONS, add_gate_parameters

            self.output_gate = GATE_FUNCTIONS[out_gate]
            add_gate_parameters(self, out_gate, dim, num_heads, gate_window, gate_src, gate_scale)

    def forward(self, x: Tensor, value_embed: Tensor | None = None) -> Tensor:
        """x: [B, T, dim]; value_embed: [B, T, kv_dim] added to c_v(x) (shared VE layers)."""
        b, t, _ = x.shape
        q_raw = self.c_q(x)
        q = q_raw.reshape(b, t, self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.c_v(x)
        if value_embed is not None:
            v = v + value_embed
        v = self.value_mix(self, v)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q = self.rotary(F.rms_norm(q, (q.size(-1),)))
        k = self.rotary(F.rms_norm(k, (k.size(-1),)))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.kernel(q, k, v)
        y = self.xsa(y, v)
        y = self.output_gate(self, y, x, q_raw)
        return self.proj(y.reshape(b, t, -1))


# ------------------------------------------------------------------------------------------------
# Document-masked attention (R6/R7 packed training, frontier.md 3.11)


def causal_only(model: nn.Module, ids: Tensor) -> None:
    """``GPT.prepare_attention`` when attention is plainly causal: nothing to prepare."""


def mask_documents(model: nn.Module, ids: Tensor) -> None:
    """``GPT.prepare_attention`` of document-masked attention: derive this forward's segments from
    the ids (the model's shared :class:`DocumentAttention` reads them in every layer)."""
    model.doc_attention.set_ids(ids)


def document_piece_starts(ids: Tensor, bos_id: int, window: int) -> Tensor:
    """[B, T] ids -> [B, T] int64: the first position of the segment each position belongs to.

    A segment starts at position 0 and at every BOS, and a segment longer than ``window`` is cut
    into ``window``-token pieces counted from its start: exactly the records' ``cu_seqlens`` (BOS
    positions, 0 prepended, documents cut every 2048 tokens). Static shapes (compile-friendly)."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device).expand(b, t)
    doc_start = torch.cummax(torch.where(ids == bos_id, pos, torch.zeros_like(pos)), dim=1).values
    return doc_start + torch.div(pos - doc_start, window, rounding_mode="floor") * window


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [N, Tq, H, D], k/v [N, Tk, Hkv, D], mask [N, Tq, Tk] (True = attend) -> [N, Tq, H, D]."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], enable_gqa=k.size(2) != q.size(2)
    )
    return y.transpose(1, 2)


def document_attention_reference(q: Tensor, k: Tensor, v: Tensor, piece_start: Tensor, window: int) -> Tensor:
    """Exact document-masked causal attention in PyTorch (CPU, or a GPU without FlashAttention).

    Query i attends to keys j with piece_start[i] <= j <= i. For T <= window one block-diagonal
    causal mask [B, T, T]; for longer rows (packed training) the row is cut into blocks of
    ``window`` and block c attends to blocks c - 1 and c only (a segment is at most ``window``
    long, so nothing else can be in it): memory and work O(T * window) instead of O(T^2)."""
    b, t = q.shape[:2]
    pos = torch.arange(t, device=q.device)
    if t <= window:
        mask = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= piece_start[:, :, None])
        return _sdpa(q, k, v, mask)
    nb = -(-t // window)
    pad = nb * window - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        tail = torch.arange(t, t + pad, device=q.device).expand(b, pad)
        piece_start = torch.cat((piece_start, tail), dim=1)  # padded queries attend to themselves only
    w = window
    qb = q.reshape(b * nb, w, *q.shape[2:])
    prev_k = F.pad(k, (0, 0, 0, 0, w, 0))[:, : nb * w]  # block c - 1 (zeros before block 0)
    prev_v = F.pad(v, (0, 0, 0, 0, w, 0))[:, : nb * w]
    kb = torch.cat((prev_k.reshape(b, nb, w, *k.shape[2:]), k.reshape(b, nb, w, *k.shape[2:])), dim=2).reshape(b * nb, 2 * w, *k.shape[2:])
    vb = torch.cat((prev_v.reshape(b, nb, w, *v.shape[2:]), v.reshape(b, nb, w, *v.shape[2:])), dim=2).reshape(b * nb, 2 * w, *v.shape[2:])
    qpos = torch.arange(nb * w, device=q.device).view(nb, w)  # absolute query positions per block
    kpos = qpos[:, :1] - w + torch.arange(2 * w, device=q.device)[None, :]  # absolute key positions per block
    ps = piece_start.reshape(b, nb, w)
    mask = (kpos[None, :, None, :] <= qpos[None, :, :, None]) & (kpos[None, :, None, :] >= ps[..., None]) & (kpos[None, :, None, :] >= 0)
    y = _sdpa(qb, kb, vb, mask.reshape(b * nb, w, 2 * w))
    return y.reshape(b, nb * w, *y.shape[2:])[:, :t]


def document_attention_pieces(q: Tensor, k: Tensor, v: Tensor, piece_start: Tensor) -> Tensor:
    """The same attention as :func:`document_attention_reference`, computed piece by piece: the
    pieces (data-dependent, so eager mode only) are grouped by length into power-of-two buckets,
    each bucket gathered into a [pieces, length] batch and run through causal SDPA (its fused
    kernel), and the outputs scattered back. Work ~ the sum of squared piece lengths, as
    FlashAttention's varlen kernel; positions past a piece's end only pad its batch row and, the
    attention being causal, never reach the piece's own positions."""
    b, t, h, d = q.shape
    n = b * t
    flat = torch.arange(n, device=q.device)
    starts = torch.nonzero((piece_start + (torch.arange(b, device=q.device) * t)[:, None]).reshape(-1) == flat).flatten()
    lens = torch.diff(starts, append=flat.new_full((1,), n))
    qf, kf, vf = q.reshape(n, h, d), k.reshape(n, k.size(2), d), v.reshape(n, v.size(2), d)
    positions, values = [], []
    caps = torch.clamp(torch.ceil(torch.log2(lens.double())), min=4).long()  # bucket: length <= 2^cap, at least 16
    for cap in torch.unique(caps).tolist():
        sel = caps == cap
        s0, ln = starts[sel], lens[sel]
        width = min(1 << cap, int(ln.max()))
        idx = (s0[:, None] + torch.arange(width, device=q.device)[None, :]).clamp_max(n - 1)
        y = F.scaled_dot_product_attention(
            qf[idx].transpose(1, 2), kf[idx].transpose(1, 2), vf[idx].transpose(1, 2), is_causal=True, enable_gqa=k.size(2) != h
        ).transpose(1, 2)
        valid = torch.arange(width, device=q.device)[None, :] < ln[:, None]
        positions.append(idx[valid])
        values.append(y[valid])
    vals = torch.cat(values)
    return vals.new_zeros(n, h, d).index_put((torch.cat(positions),), vals).reshape(b, t, h, d)


def _import_varlen():
    """FlashAttention's varlen function (FA3 ``flash_attn_interface``, else FA2 ``flash_attn``), or None."""
    try:
        from flash_attn_interface import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        try:
            from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
        except ImportError:
            return None
    return flash_attn_varlen_func


class DocumentAttention:
    """The attention kernel of a document-masked model, shared by its layers: attention never
    crosses a BOS, and a document longer than ``window`` is cut into ``window``-token pieces.

    ``GPT.forward_hidden`` calls :meth:`set_ids` with the forward's ids (through
    ``model.prepare_attention``), so the forward signature is unchanged and the segments come from
    the ids themselves, for packed training rows, evaluation windows and TTT alike. On CUDA with
    FlashAttention importable and bf16/fp16 inputs the segments become ``cu_seqlens`` for
    ``flash_attn_varlen_func`` (static-shape: zero-length pieces pad the list to B*T + 1 entries,
    so it compiles with fullgraph); everywhere else the same attention is computed exactly in
    PyTorch: piece by piece in eager mode (:func:`document_attention_pieces`), with static-shape
    block masks under torch.compile (:func:`document_attention_reference`)."""

    def __init__(self, bos_id: int, window: int, backend: str = "auto"):
        self.bos_id, self.window = int(bos_id), int(window)
        self.varlen = None if backend == "sdpa" else _import_varlen()
        if backend == "flash3" and self.varlen is None:
            from pgolf.errors import MissingDependencyError

            raise MissingDependencyError(
                "model.attention_backend=flash3 with model.doc_attention_window needs FlashAttention's varlen kernel "
                "(flash_attn_interface); install it or set model.attention_backend=sdpa"
            )
        self.piece_start: Tensor | None = None

    def set_ids(self, ids: Tensor) -> None:
        self.piece_start = document_piece_starts(ids, self.bos_id, self.window)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ps = self.piece_start
        assert ps is not None and ps.shape == q.shape[:2], "document attention: set_ids was not called with this forward's ids"
        if self.varlen is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return self._flash_varlen(q, k, v, ps)
        if torch.compiler.is_compiling():  # static shapes for a compiled graph
            return document_attention_reference(q, k, v, ps, self.window)
        return document_attention_pieces(q, k, v, ps)

    def _flash_varlen(self, q: Tensor, k: Tensor, v: Tensor, ps: Tensor) -> Tensor:
        b, t = q.shape[:2]
        n = b * t
        flat = torch.arange(n, device=q.device)
        starts = (ps + (torch.arange(b, device=q.device) * t)[:, None]).reshape(-1) == flat  # segment starts
        cu = torch.sort(torch.where(starts, flat, torch.full_like(flat, n))).values
        cu = torch.cat((cu, flat.new_full((1,), n))).to(torch.int32)
        m = min(self.window, t)
        out = self.varlen(q.reshape(n, *q.shape[2:]), k.reshape(n, *k.shape[2:]), v.reshape(n, *v.shape[2:]), cu, cu, m, m, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(b, t, *out.shape[1:])
