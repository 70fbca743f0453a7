"""Environment-variable overrides: the challenge's names (``NUM_LAYERS``, ``SEED``, ``DATA_PATH``,
...) and a generic ``PGOLF_<SECTION>_<KEY>`` form for every other config key.

This is the one mapping table between the challenge's ``train_gpt.py`` environment variables and
pgolf's ``section.key`` settings. The bundled ``train_gpt.py`` (``pgolf bundle``) starts from the
configuration embedded in it and applies these variables on top, so a submission launches the way
the challenge's scripts do::

    SEED=42 MAX_WALLCLOCK_SECONDS=600 torchrun --standalone --nproc_per_node=8 train_gpt.py

``pgolf train`` does not read them: on the command line, use ``--set section.key=value``.

Rules: values are parsed like ``--set`` values (TOML scalars; a comma list for list settings;
string settings take the text as is). Two variables naming the same setting with different values
are an error, as is any ``PGOLF_*`` variable that is not a setting (except the non-config ones in
:data:`NON_CONFIG_PGOLF_VARS`), and the challenge switches pgolf expresses differently
(:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pgolf.config import SECTIONS, RunConfig, get_value, parse_set_args, set_value
from pgolf.errors import ConfigError

#: Challenge env var -> pgolf setting. Names follow the challenge's scripts (root train_gpt.py and
#: the PR #89/#201/#401 records); several names may map to one setting (aliases).
CHALLENGE_ENV: dict[str, str] = {
    # model shape and techniques
    "VOCAB_SIZE": "model.vocab_size",
    "NUM_LAYERS": "model.num_layers",
    "MODEL_DIM": "model.model_dim",
    "NUM_HEADS": "model.num_heads",
    "NUM_KV_HEADS": "model.num_kv_heads",
    "MLP_MULT": "model.mlp_mult",
    "TIE_EMBEDDINGS": "model.tie_embeddings",
    "TIED_EMBED_INIT_STD": "model.tied_embed_init_std",
    "ROPE_BASE": "model.rope_base",
    "ROPE_DIMS": "model.rope_dims",
    "LOGIT_SOFTCAP": "model.logit_softcap",
    "QK_GAIN_INIT": "model.qk_gain_init",
    "XSA_LAST_N": "model.xsa_last_n",
    "LN_SCALE": "model.ln_scale",
    "BIGRAM_VOCAB_SIZE": "model.bigram_buckets",
    "BIGRAM_DIM": "model.bigram_dim",
    "VE_DIM": "model.ve_dim",
    "VE_LAYERS": "model.ve_layers",
    # training loop
    "SEED": "train.seed",
    "ITERATIONS": "train.iterations",
    "TRAIN_BATCH_TOKENS": "train.train_batch_tokens",
    "TRAIN_SEQ_LEN": "train.train_seq_len",
    "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds",
    "WARMDOWN_ITERS": "train.warmdown_iters",
    "WARMUP_STEPS": "train.warmup_steps",
    "VAL_LOSS_EVERY": "train.val_loss_every",
    "TRAIN_LOG_EVERY": "train.train_log_every",
    # evaluation
    "EVAL_SEQ_LEN": "eval.eval_seq_len",
    "EVAL_STRIDE": "eval.sliding_stride",
    "VAL_BATCH_SIZE": "eval.val_batch_tokens",  # the challenge's VAL_BATCH_SIZE counts tokens
    # optimizers
    "MATRIX_LR": "optim.matrix_lr",
    "SCALAR_LR": "optim.scalar_lr",
    "TIED_EMBED_LR": "optim.tied_embed_lr",
    "EMBED_LR": "optim.embed_lr",
    "HEAD_LR": "optim.head_lr",
    "MUON_MOMENTUM": "optim.muon_momentum",
    "MUON_MOMENTUM_WARMUP_START": "optim.muon_momentum_warmup_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "optim.muon_momentum_warmup_steps",
    "MUON_BACKEND_STEPS": "optim.muon_backend_steps",
    "MUON_WD": "optim.muon_wd",
    "ADAM_WD": "optim.adam_wd",
    "BETA1": "optim.adam_beta1",
    "BETA2": "optim.adam_beta2",
    "ADAM_EPS": "optim.adam_eps",
    "GRAD_CLIP_NORM": "optim.grad_clip_norm",
    # averaging and QAT
    "EMA_DECAY": "avg.ema_decay",
    "LAWA_EMA_DECAY": "avg.ema_decay",  # PR #201's name for the same EMA
    "SWA_EVERY": "avg.swa_every",
    "LATE_QAT_THRESHOLD": "quant.qat_threshold",
    # data
    "DATA_PATH": "data.path",
    "TOKENIZER_PATH": "data.tokenizer",
}

#: Variables the bundled script reads that are not settings.
RUN_ENV: dict[str, str] = {
    "RUN_ID": "name of the run folder logs/<RUN_ID>/ (default <preset>_seed<SEED>, with _2, _3, ... if taken)",
}

#: ``PGOLF_*`` variables of other parts of pgolf, never settings.
NON_CONFIG_PGOLF_VARS = frozenset({"PGOLF_CACHE"})

#: Challenge switches that pgolf expresses through another setting: setting them is an error
#: (ignoring them would silently run something else than the user asked for).
UNSUPPORTED: dict[str, str] = {
    "SWA_ENABLED": "SWA is on when SWA_EVERY > 0 (and PGOLF_AVG_EXPORT=swa)",
    "LAWA_ENABLED": "the EMA is on when EMA_DECAY (or LAWA_EMA_DECAY) > 0 (and PGOLF_AVG_EXPORT=ema)",
    "QAT_ENABLED": "set PGOLF_QUANT_QAT=always, late or off",
}

PREFIX = "PGOLF_"

#: In a bundled script, the settings besides those of :data:`CHALLENGE_ENV` that it takes from
#: ``PGOLF_*`` variables: ``pgolf bundle`` writes every other setting's value into the script's code
#: (pgolf.train.fold), so a variable naming one of those is an error there. None in the package:
#: every setting.
LIVE: tuple[str, ...] | None = None


def env_name(dotted: str) -> str:
    """The generic variable of a setting: ``train.seed`` -> ``PGOLF_TRAIN_SEED``."""
    section, _, key = dotted.partition(".")
    return f"{PREFIX}{section.upper()}_{key.upper()}"


def all_settings() -> list[str]:
    """Every ``section.key`` of a RunConfig, in declaration order."""
    import dataclasses

    cfg = RunConfig()
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _generic_table() -> dict[str, str]:
    return {env_name(d): d for d in all_settings()}


def resolve_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """The ``(variable, setting, raw value)`` triples that ``environ`` (default ``os.environ``)
    sets, sorted by variable name. Raises ConfigError for unknown ``PGOLF_*`` names, for the
    switches in :data:`UNSUPPORTED`, and for two variables giving one setting different values."""
    env = os.environ if environ is None else environ
    generic = _generic_table()
    found: list[tuple[str, str, str]] = []
    for name in sorted(env):
        raw = env[name]
        if name in UNSUPPORTED:
            raise ConfigError(f"environment variable {name} is not used by pgolf: {UNSUPPORTED[name]}")
        if name in CHALLENGE_ENV:
            found.append((name, CHALLENGE_ENV[name], raw))
        elif name.startswith(PREFIX) and name not in NON_CONFIG_PGOLF_VARS:
            if name not in generic:
                raise ConfigError(_unknown_message(name, generic))
            found.append((name, generic[name], raw))
    by_setting: dict[str, tuple[str, str]] = {}
    for name, dotted, raw in found:
        if LIVE is not None and dotted not in LIVE and dotted not in CHALLENGE_ENV.values():
            raise ConfigError(f"environment variable {name}: {dotted} is built into this script (pgolf bundle wrote its value "
                              f"into the code); generate the script again with pgolf bundle --set {dotted}=...")
        if dotted in by_setting and by_setting[dotted][1] != raw:
            other = by_setting[dotted][0]
            raise ConfigError(f"environment variables {other}={by_setting[dotted][1]!r} and {name}={raw!r} both set {dotted}; unset one")
        by_setting[dotted] = (name, raw)
    return found


def _unknown_message(name: str, generic: dict[str, str]) -> str:
    section = name[len(PREFIX):].split("_")[0].lower()
    if section in SECTIONS:
        valid = sorted(v for v, d in generic.items() if d.startswith(section + "."))
        return f"environment variable {name} is not a setting; valid {PREFIX}{section.upper()}_* names: {', '.join(valid)}"
    return (
        f"environment variable {name} is not a setting: names look like {PREFIX}<SECTION>_<KEY> with SECTION in "
        f"{', '.join(s.upper() for s in SECTIONS)} (or use the challenge names, e.g. NUM_LAYERS, SEED)"
    )


def apply_env(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> list[tuple[str, str, Any]]:
    """Apply the environment's overrides to ``cfg`` in place (then validate it); returns the
    ``(variable, setting, value)`` triples applied, for the log."""
    applied = []
    for name, dotted, raw in resolve_env(environ):
        current = get_value(cfg, dotted)
        # String settings (paths) take the text verbatim; everything else parses like --set.
        value: Any = raw if isinstance(current, str) else parse_set_args([f"{dotted}={raw}"])[0][1]
        try:
            set_value(cfg, dotted, value)
        except ConfigError as exc:
            raise ConfigError(f"environment variable {name}: {exc}") from None
        applied.append((name, dotted, get_value(cfg, dotted)))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"after applying environment overrides: {exc}") from None
    return applied


def challenge_name(dotted: str) -> str:
    """The variable to use for a setting in commands: the challenge name if there is one."""
    for name, d in CHALLENGE_ENV.items():
        if d == dotted:
            return name
    return env_name(dotted)
