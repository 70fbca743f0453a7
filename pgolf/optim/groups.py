"""Which parameter goes to which optimizer, and the optimizers themselves.

The rule reproduces all three submissions and the baseline:

* token group (Adam/AdamW at tied_embed_lr): every ``nn.Embedding`` weight: ``tok_emb``,
  ``bigram.embed``, ``ve_shared.embed``;
* head group (Adam/AdamW at head_lr): an untied ``lm_head``;
* matrix group (Muon or NorMuon at matrix_lr): every other 2-D parameter that is not a control
  tensor: the block matrices, ``bigram.proj``, ``ve_shared.proj``;
* scalar group (Adam/AdamW at scalar_lr): everything else: 1-D/0-D parameters and the control
  tensors (``resid_mix`` is 2-D but a control tensor), ``skip_weights``, ``smear.gate``, scales.

With ``optim.decoder_lr_mult`` != 1 (an experiment switch, off in every preset) the matrix
optimizer has two parameter groups: the matrices of the decoder-only blocks
(``ModelConfig.decoder_only_blocks``) at matrix_lr * decoder_lr_mult, and the rest at matrix_lr.

Adam groups are ``torch.optim.AdamW`` (weight decay 0 makes it plain Adam): the token group decays
with ``embed_wd``, the scalar group with ``scalar_wd`` (R3+ use 0.085 / 0.02), the head group with
``adam_wd``; embed_wd / scalar_wd = -1 fall back to adam_wd. Every group records ``base_lr`` so the
schedule can set ``lr = base_lr * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgolf.model.config import is_control_tensor
from pgolf.optim.config import OptimConfig
from pgolf.optim.muon import MOMENTUM_DTYPES, Muon


@dataclass
class ParamGroups:
    token: list[tuple[str, nn.Parameter]]
    head: list[tuple[str, nn.Parameter]]
    matrix: list[tuple[str, nn.Parameter]]
    scalar: list[tuple[str, nn.Parameter]]

    def names(self) -> dict[str, list[str]]:
        return {k: [n for n, _ in getattr(self, k)] for k in ("token", "head", "matrix", "scalar")}


def split_parameters(model: nn.Module) -> ParamGroups:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if head is not None else set()
    groups = ParamGroups([], [], [], [])
    for name, p in model.named_parameters():
        if id(p) in embedding_weights:
            groups.token.append((name, p))
        elif id(p) in head_ids:
            groups.head.append((name, p))
        elif p.ndim == 2 and not is_control_tensor(name):
            groups.matrix.append((name, p))
        else:
            groups.scalar.append((name, p))
    return groups


def build_optimizers(model: nn.Module, cfg: OptimConfig, tied_embeddings: bool, fused: bool = False) -> list[torch.optim.Optimizer]:
    """Optimizers in step order: token Adam, (head Adam), matrix Muon/NorMuon, scalar Adam."""
    groups = split_parameters(model)

    def adam(params: list[tuple[str, nn.Parameter]], lr: float, wd: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [{"params": [p for _, p in params], "lr": lr, "base_lr": lr}],
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=wd,
            fused=fused,
        )

    token_lr = cfg.tied_embed_lr if tied_embeddings else cfg.embed_lr
    optimizers: list[torch.optim.Optimizer] = [adam(groups.token, token_lr, cfg.group_wd("embed_wd"))]
    if groups.head:
        optimizers.append(adam(groups.head, cfg.head_lr, cfg.adam_wd))
    matrix_params = matrix_param_groups(model, groups.matrix, cfg)
    if cfg.matrix_optimizer == "normuon":
        if cfg.muon_wd:
            from pgolf.errors import ConfigError

            raise ConfigError("optim.muon_wd is not supported with optim.matrix_optimizer=normuon (PR #89 has no WD)")
        from pgolf.optim.normuon import NorMuon

        matrix_opt: torch.optim.Optimizer = NorMuon(
            matrix_params, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, beta2=cfg.normuon_beta2, backend_steps=cfg.muon_backend_steps
        )
    else:
        matrix_opt = Muon(
            matrix_params,
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps,
            nesterov=cfg.muon_nesterov,
            weight_decay=cfg.muon_wd,
            ns=cfg.muon_ns,
            row_normalize=cfg.muon_row_normalize,
            momentum_dtype=MOMENTUM_DTYPES[cfg.muon_momentum_dtype],
            layout=cfg.muon_layout,
        )
    for group in matrix_opt.param_groups:
        group.setdefault("base_lr", cfg.matrix_lr)
        group["base_weight_decay"] = cfg.muon_wd  # the WD taper sets weight_decay = base * multiplier
    optimizers.append(matrix_opt)
    optimizers.append(adam(groups.scalar, cfg.scalar_lr, cfg.group_wd("scalar_wd")))
    return optimizers


def decoder_matrix_names(model: nn.Module, matrix: list[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of the matrix-group parameters inside the decoder-only blocks of ``model``."""
    prefixes = tuple(f"blocks.{i}." for i in model.cfg.decoder_only_blocks())
    return [name for name, _ in matrix if name.startswith(prefixes)]


def matrix_param_groups(model: nn.Module, matrix: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list:
    """The matrix optimizer's params: one list, or (decoder_lr_mult != 1) two groups with their base LRs."""
    if cfg.decoder_lr_mult == 1.0:
        return [p for _, p in matrix]
    decoder = set(decoder_matrix_names(model, matrix))
    rest_lr, dec_lr = cfg.matrix_lr, cfg.matrix_lr * cfg.decoder_lr_mult
    return [
        {"params": [p for n, p in matrix if n not in decoder], "lr": rest_lr, "base_lr": rest_lr},
        {"params": [p for n, p in matrix if n in decoder], "lr": dec_lr, "base_lr": dec_lr},
    ]


def matrix_optimizer(optimizers: list[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """The Muon/NorMuon optimizer (the one whose groups carry a momentum)."""
    return next(o for o in optimizers if "momentum" in o.param_groups[0] and "betas" not in o.param_groups[0])


def replicated_parameters(optimizers: list[torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Every parameter outside the matrix optimizer (the Adam groups): the ones whose grads
    ``all_reduce_replicated_grads`` averages in the sharded layout."""
    matrix = matrix_optimizer(optimizers)
    return [p for o in optimizers if o is not matrix for g in o.param_groups for p in g["params"]]
