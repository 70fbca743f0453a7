"""Presets, profiles and overrides: composition order, type checks, unknown keys."""

from __future__ import annotations

import pytest

from pgolf.config import (
    RunConfig, diff_from_defaults, from_dict, list_presets, list_profiles, load_config, parse_set_args, to_dict,
)
from pgolf.errors import ConfigError


def test_every_shipped_preset_and_profile_parses_and_validates():
    assert {"baseline", "pr89", "pr201", "pr401"} <= set(list_presets())
    assert {"8xh100", "1xh100", "cpu"} <= set(list_profiles())
    for preset in list_presets():
        for profile in [None, *list_profiles()]:
            load_config(preset, profile)


def test_layers_compose_in_order_defaults_preset_profile_overrides():
    cfg = load_config("pr401", "cpu", parse_set_args(["model.num_layers=7", "train.seed=42"]))
    assert cfg.model.mlp_mult == 3.0  # preset
    assert cfg.model.model_dim == 128  # profile
    assert cfg.model.num_layers == 7 and cfg.train.seed == 42  # overrides
    assert cfg.model.rope_dims == 16 and cfg.model.xsa_last_n == 4  # technique stack kept at the cpu size


def test_profile_scale_table_shrinks_step_schedules():
    full, cpu = load_config("pr401"), load_config("pr401", "cpu")
    assert cpu.train.warmdown_iters == round(full.train.warmdown_iters * 0.035)
    assert cpu.avg.swa_every == max(1, round(full.avg.swa_every * 0.035))
    # the EMA horizon 1/(1-d) scales like the step count
    assert 1 / (1 - cpu.avg.ema_decay) == pytest.approx(0.035 / (1 - full.avg.ema_decay))
    assert load_config("baseline", "cpu").avg.ema_decay == 0.0  # off stays off


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as exc:
        load_config("baseline", None, [("model.num_layer", 3)])
    assert "model.num_layer" in str(exc.value) and "num_layers" in str(exc.value)
    with pytest.raises(ConfigError, match="section.key"):
        load_config("baseline", None, [("nosuch.key", 1)])


def test_unknown_preset_and_profile_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid presets: .*pr401"):
        load_config("pr999")
    with pytest.raises(ConfigError, match="valid profiles: .*cpu"):
        load_config("baseline", "tpu")


@pytest.mark.parametrize(
    "item,expected",
    [("model.num_layers=11", 11), ("model.mlp_mult=3", 3.0), ("model.ln_scale=true", True),
     ("model.ve_layers=[-2, -1]", [-2, -1]), ("model.ve_layers=9,10", [9, 10]),
     ("quant.mlp_format=int5:max:full", "int5:max:full")],
)
def test_set_values_are_parsed_and_typed(item, expected):
    key = item.split("=")[0]
    cfg = load_config("pr401", None, parse_set_args([item]))
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected


@pytest.mark.parametrize("item", ["model.num_layers=abc", "model.num_layers=2.5", "model.ln_scale=maybe", "train.seed=true"])
def test_wrongly_typed_values_are_errors(item):
    with pytest.raises(ConfigError, match="expected"):
        load_config("baseline", None, parse_set_args([item]))


@pytest.mark.parametrize(
    "item,match",
    [("model.model_dim=500", "divisible"), ("model.xsa_last_n=12", "xsa_last_n"), ("model.ve_layers=[11]", "ve_layers"),
     ("quant.mlp_format=int9", "N must be in 2..8"), ("quant.codec=gzip", "quant.codec"),
     ("avg.export=ema", "ema_decay"), ("data.val_glob=fineweb_train_*.bin", "differ")],
)
def test_invalid_values_name_the_key(item, match):
    preset = "baseline"
    with pytest.raises(ConfigError, match=match):
        load_config(preset, None, parse_set_args([item]))


def test_to_dict_from_dict_round_trip_and_diff():
    cfg = load_config("pr201", "cpu")
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    diff = diff_from_defaults(cfg)
    assert diff["model"]["num_layers"] == 11 and "vocab_size" not in diff["model"]
    assert diff_from_defaults(RunConfig()) == {}
