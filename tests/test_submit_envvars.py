"""The challenge env-var table and PGOLF_<SECTION>_<KEY> overrides (pgolf.config.envvars)."""

from __future__ import annotations

import pytest

from pgolf.config import get_value, load_config
from pgolf.config.envvars import CHALLENGE_ENV, UNSUPPORTED, all_settings, apply_env, challenge_name, env_name, resolve_env
from pgolf.errors import ConfigError


def test_every_challenge_name_maps_to_a_real_setting():
    settings = set(all_settings())
    assert {v for v in CHALLENGE_ENV.values()} <= settings
    for name in ("NUM_LAYERS", "MODEL_DIM", "SEED", "MAX_WALLCLOCK_SECONDS", "DATA_PATH", "TOKENIZER_PATH", "EVAL_STRIDE"):
        assert name in CHALLENGE_ENV
    assert CHALLENGE_ENV["BIGRAM_VOCAB_SIZE"] == "model.bigram_buckets"
    assert challenge_name("train.seed") == "SEED"
    assert challenge_name("quant.codec") == "PGOLF_QUANT_CODEC" == env_name("quant.codec")


def test_apply_env_parses_like_set_and_keeps_strings_verbatim():
    cfg = load_config("pr401", "cpu")
    env = {
        "NUM_LAYERS": "5", "SEED": "42", "MAX_WALLCLOCK_SECONDS": "12.5", "TIE_EMBEDDINGS": "1",
        "VE_LAYERS": "3,4", "DATA_PATH": "./data/123", "PGOLF_QUANT_CODEC": "lzma", "PGOLF_EVAL_MAX_VAL_TOKENS": "2048",
        "HOME": "/root", "PGOLF_CACHE": "/tmp/x",  # not settings: ignored
    }
    applied = apply_env(cfg, env)
    assert cfg.model.num_layers == 5 and cfg.train.seed == 42 and cfg.train.max_wallclock_seconds == 12.5
    assert cfg.model.tie_embeddings is True and cfg.model.ve_layers == [3, 4]
    assert cfg.data.path == "./data/123"  # a path that looks like a number stays text
    assert get_value(cfg, "quant.codec") == "lzma" and cfg.eval.max_val_tokens == 2048
    assert [a[0] for a in applied] == sorted(a[0] for a in applied) and len(applied) == 8


def test_unknown_pgolf_var_lists_valid_names():
    cfg = load_config("baseline")
    with pytest.raises(ConfigError, match="PGOLF_TRAIN_SEED"):
        apply_env(cfg, {"PGOLF_TRAIN_SEEDS": "1"})
    with pytest.raises(ConfigError, match="SECTION"):
        apply_env(cfg, {"PGOLF_TRAINING_SEED": "1"})


def test_conflicts_bad_values_and_unsupported_switches_are_errors():
    cfg = load_config("baseline")
    with pytest.raises(ConfigError, match="both set avg.ema_decay"):
        resolve_env({"EMA_DECAY": "0.99", "LAWA_EMA_DECAY": "0.995"})
    assert len(resolve_env({"EMA_DECAY": "0.99", "LAWA_EMA_DECAY": "0.99"})) == 2  # same value: fine
    with pytest.raises(ConfigError, match="NUM_LAYERS.*model.num_layers: expected int"):
        apply_env(cfg, {"NUM_LAYERS": "eleven"})
    with pytest.raises(ConfigError, match="after applying environment overrides: model.model_dim"):
        apply_env(load_config("baseline"), {"MODEL_DIM": "100"})  # not divisible by 8 heads
    for name in UNSUPPORTED:
        with pytest.raises(ConfigError, match=name):
            resolve_env({name: "1"})
