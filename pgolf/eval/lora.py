"""Batched per-document LoRA of phased test-time training (frontier.md 3.18), attached to the
model's own modules.

Every row of a batch is one document and has its own adapters: for a map in -> out an adapter is
A (bsz, r, in) ~ U(+-1/sqrt(in)) and B (bsz, out, r) = 0, and adds ``(alpha / r) * (x A^T) B^T``
row by row (``torch.bmm``). The targets, per **virtual** layer slot:

* ``q``, ``k``, ``v``: the attention's own ``c_q``, ``c_k``, ``c_v`` (input: the normalised
  attention input n), so the delta of q also reaches an output gate that reads q;
* ``o``: d -> d on n, added to the attention module's output (after its projection, before
  ``attn_scale``), as the records do (frontier.md 4.23: its input is n, not the attention output);
* ``mlp``: d -> d on the MLP's normalised input, added to the MLP output before ``mlp_scale``;
* ``head``: d -> vocab on the final hidden state, added to the logits before the softcap through
  ``GPT.adapt_logits``.

The wrappers call the wrapped module itself, so every technique of the model (gates, XSA, smear,
value embeddings, two lanes, loops, ...) is in the adapted forward by construction; with B = 0 the
output is the base model's bit for bit.

Virtual slots. With loops on, one physical block runs in several virtual slots, and each slot has
its own adapters. A wrapper counts its calls within one forward: the k-th call of block i's module
is its k-th virtual slot (the forward walks the virtual layer list in order). ``token_nll`` resets
the counters before the forward and checks after it that every wrapper was called exactly once per
slot, so a forward that ran another layer list (loops off) is an error, never a silent mix-up.

``rows`` selects the batch rows of the current forward (a slice of the documents, the ones that
still have a chunk to score), so the adapters of finished documents sit out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pgolf.eval.config import PHASED_TARGETS


class DocAdapter(nn.Module):
    """Per-document low-rank maps in -> out for ``bsz`` documents."""

    def __init__(self, bsz: int, in_features: int, out_features: int, rank: int, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lora_a = nn.Parameter(torch.zeros(bsz, rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(bsz, out_features, rank, device=device))

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None) -> None:
        """B = 0; A re-drawn from U(+-1/sqrt(in)) when a generator is given (else kept)."""
        self.lora_b.zero_()
        if generator is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            a = torch.empty(self.lora_a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            self.lora_a.copy_(a)

    def delta(self, x: Tensor, rows: slice, scale: float) -> Tensor:
        """x [n, T, in] for the documents ``rows`` -> [n, T, out]."""
        a = self.lora_a[rows].to(x.dtype)
        b = self.lora_b[rows].to(x.dtype)
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scale


class SlotAdapted(nn.Module):
    """Wraps one of the model's modules; the k-th call in a forward adds ``adapters[k]``."""

    def __init__(self, base: nn.Module, adapters: list[DocAdapter], owner: "DocLoRA"):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleList(adapters)
        self.calls = 0
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, x: Tensor, *rest: object) -> Tensor:
        k = self.calls
        self.calls += 1
        owner = self._owner[0]
        return self.base(x, *rest) + self.adapters[k].delta(x, owner.rows, owner.scale)


class DocLoRA:
    """Per-document adapters on a model (attached in place; ``detach`` restores the model).

    ``bsz`` documents, rank ``rank``, scale ``alpha / rank``; ``targets`` from ``PHASED_TARGETS``."""

    def __init__(self, model: nn.Module, bsz: int, rank: int, alpha: float, targets: list[str] | tuple[str, ...] = PHASED_TARGETS):
        unknown = [t for t in targets if t not in PHASED_TARGETS]
        assert not unknown, f"unknown adapter targets {unknown}"
        self.model = model
        self.bsz, self.rank, self.scale = bsz, rank, float(alpha) / rank
        self.rows = slice(0, bsz)
        device = model.tok_emb.weight.device
        virtual = list(model.encoder_layers) + list(model.decoder_layers) + list(model.lane_layers)
        self.num_slots = len(virtual)
        uses = {i: virtual.count(i) for i in set(virtual)}
        cfg = model.cfg
        d, kv = cfg.model_dim, cfg.kv_dim
        self.wrappers: list[SlotAdapted] = []
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        self.adapters: list[DocAdapter] = []

        def wrap(parent: nn.Module, name: str, n_in: int, n_out: int, slots: int) -> None:
            adapters = [DocAdapter(bsz, n_in, n_out, rank, device) for _ in range(slots)]
            original = getattr(parent, name)
            assert not isinstance(original, SlotAdapted), "the model already carries document adapters"
            wrapper = SlotAdapted(original, adapters, self)
            setattr(parent, name, wrapper)  # installed at once: the next wrapper (attn) wraps this one's parent
            self._restore.append((parent, name, original))
            self.wrappers.append(wrapper)
            self.adapters += adapters

        for i in sorted(uses):  # inner modules (c_q, c_k, c_v) before the attention module around them
            block = model.blocks[i]
            for target, name, n_out in (("q", "c_q", d), ("k", "c_k", kv), ("v", "c_v", kv)):
                if target in targets:
                    wrap(block.attn, name, d, n_out, uses[i])
            if "o" in targets:
                wrap(block, "attn", d, d, uses[i])
            if "mlp" in targets:
                wrap(block, "mlp", d, d, uses[i])
        self.head: DocAdapter | None = None
        self._head_calls = 0
        self._previous_head = model.adapt_logits
        if "head" in targets:
            self.head = DocAdapter(bsz, d, cfg.vocab_size, rank, device)
            self.adapters.append(self.head)
            model.adapt_logits = self._head_logits
        self.attached = True

    def attach(self) -> None:
        """Install the wrappers again after ``detach`` (inner modules first)."""
        assert not self.attached, "the adapters are attached already"
        for (parent, name, _), wrapper in zip(self._restore, self.wrappers):
            setattr(parent, name, wrapper)
        self._previous_head = self.model.adapt_logits
        if self.head is not None:
            self.model.adapt_logits = self._head_logits
        self.attached = True

    # ---- the adapted forward --------------------------------------------------------------------
    def _head_logits(self, model: nn.Module, hidden: Tensor, logits: Tensor) -> Tensor:
        self._head_calls += 1
        return logits + self.head.delta(hidden, self.rows, self.scale)

    def token_nll(self, ids: Tensor, targets: Tensor, first_scored: int = 0) -> Tensor:
        """``model.token_nll`` with the adapters of documents ``rows`` (one row per document)."""
        assert self.attached, "the adapters were detached"
        n = len(range(*self.rows.indices(self.bsz)))
        assert ids.size(0) == n, f"batch of {ids.size(0)} rows for adapters of {n} documents"
        for w in self.wrappers:
            w.calls = 0
        self._head_calls = 0
        out = self.model.token_nll(ids, targets, first_scored)
        wrong = [w.calls for w in self.wrappers if w.calls != len(w.adapters)]
        assert not wrong, f"adapted modules ran {wrong} times, not once per virtual slot: the layer list changed"
        assert self.head is None or self._head_calls == 1, "the LM-head adapter ran more than once"
        return out

    # ---- state --------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for p in (a.lora_a, a.lora_b)]

    def reset(self, generator: torch.Generator | None) -> None:
        """Zero every B; re-draw every A from ``generator`` (None keeps A: the warm start)."""
        for a in self.adapters:
            a.reset(generator)

    def detach(self) -> None:
        """Put the model's own modules back (reverse order: outer wrappers first)."""
        assert self.attached, "the adapters are detached already"
        for parent, name, original in reversed(self._restore):
            setattr(parent, name, original)
        self.model.adapt_logits = self._previous_head
        self.attached = False


def attach_doc_lora(model: nn.Module, bsz: int, rank: int, alpha: float, targets, generator: torch.Generator) -> DocLoRA:
    """Adapters for ``bsz`` documents with A drawn from ``generator`` and B = 0."""
    lora = DocLoRA(model, bsz, rank, alpha, list(targets))
    lora.reset(generator)
    return lora
