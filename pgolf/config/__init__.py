"""Run configuration: the component configs composed, plus presets, profiles and overrides.

A run's configuration is built in four layers, each a set of ``section.key = value`` pairs:

1. the dataclass defaults (the challenge baseline),
2. a *preset* (``presets/<name>.toml``): a recipe, e.g. the technique stack of PR #401,
3. a *profile* (``profiles/<name>.toml``): a hardware budget (batch, sequence length, wallclock
   cap, width/depth) that keeps the preset's techniques but sizes the run for the machine,
4. ``--set section.key=value`` overrides from the command line.

Unknown sections or keys are errors that list the valid names. The resolved config is a plain
dict (``to_dict``) written to every run folder and embedded in every artifact.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pgolf.data.config import DataConfig
from pgolf.errors import ConfigError
from pgolf.eval.config import EvalConfig, TTTConfig
from pgolf.model.config import ModelConfig
from pgolf.optim.config import OptimConfig
from pgolf.quant.config import QuantConfig
from pgolf.train.config import AveragingConfig, TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    preset: str = "baseline"
    profile: str = "none"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    avg: AveragingConfig = field(default_factory=AveragingConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "RunConfig":
        for name in SECTIONS:
            getattr(self, name).validate()
        self.check_switches()
        return self

    def check_switches(self) -> None:
        """Experiment switches (issue 16) that depend on another section."""
        if self.model.tanh_reparam > 0 and self.quant.qat != "off":
            raise ConfigError("model.tanh_reparam: QAT's grid reads the raw master weight, not a*tanh(W/a); set quant.qat=off or model.tanh_reparam=0")
        if self.train.seq_len_schedule and getattr(self.data, "loader", "stream") != "stream":
            raise ConfigError(f"train.seq_len_schedule: needs data.loader=stream (data.loader={self.data.loader} fixes its sequence length)")

    @property
    def eval_seq_len(self) -> int:
        return self.eval.eval_seq_len or self.train.train_seq_len


SECTIONS: tuple[str, ...] = ("model", "optim", "train", "avg", "quant", "eval", "ttt", "data")
_META_KEYS = ("description", "notes", "expected_params")


# ------------------------------------------------------------------------------------------------
# presets and profiles (TOML files shipped inside the package)


def _toml_names(folder: str) -> list[str]:
    root = resources.files("pgolf.config").joinpath(folder)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def list_presets() -> list[str]:
    return _toml_names("presets")


def list_profiles() -> list[str]:
    return _toml_names("profiles")


def read_recipe(kind: str, name: str) -> dict[str, Any]:
    """Parsed TOML of a preset or profile (``kind`` is ``presets`` or ``profiles``)."""
    names = _toml_names(kind)
    if name not in names:
        what = kind[:-1]
        raise ConfigError(f"unknown {what} {name!r}; valid {what}s: {', '.join(names)}")
    text = resources.files("pgolf.config").joinpath(kind, f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def preset_meta(name: str) -> dict[str, Any]:
    data = read_recipe("presets", name)
    return {k: data[k] for k in _META_KEYS if k in data}


# ------------------------------------------------------------------------------------------------
# overrides


def _valid_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(getattr(RunConfig(), section))]


def _coerce(section: str, key: str, value: Any, type_name: str) -> Any:
    where = f"{section}.{key}"

    def fail() -> ConfigError:
        return ConfigError(f"{where}: expected {type_name}, got {value!r}")

    if type_name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
            return value.lower() in ("true", "1", "on")
        raise fail()
    if type_name == "int":
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if type_name == "str":
        if not isinstance(value, str):
            raise fail()
        return value
    if type_name.startswith("list["):
        inner = type_name[5:-1]
        if isinstance(value, str) and inner != "str":
            value = [v for v in value.split(",") if v.strip()]
            value = [_parse_scalar(v.strip()) for v in value]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail()
        return [_coerce(section, key, v, inner) for v in value]
    raise AssertionError(f"unsupported config field type {type_name} for {where}")


def _parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (numbers, booleans, arrays, quoted strings);
    anything that is not valid TOML is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_value(cfg: RunConfig, dotted: str, value: Any) -> None:
    section, sep, key = dotted.partition(".")
    if not sep or section not in SECTIONS:
        raise ConfigError(f"unknown config key {dotted!r}: keys look like section.key with section in {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown config key {dotted!r}; valid keys in [{section}]: {', '.join(fields)}")
    setattr(obj, key, _coerce(section, key, value, str(fields[key].type)))


def get_value(cfg: RunConfig, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or key not in _valid_keys(section):
        set_value(cfg, dotted, None)  # raises the unknown-key error with the valid keys
    return getattr(getattr(cfg, section), key)


def scale_value(cfg: RunConfig, dotted: str, factor: float, source: str) -> None:
    """Multiply a numeric setting (a profile's ``[scale]`` table): step-count schedules shrink with
    the number of steps a machine can run. Integers round to the nearest value >= 1; 0 stays 0.
    ``avg.ema_decay`` is scaled through its horizon 1 / (1 - decay), so the EMA averages over the
    same fraction of the run (0, EMA off, stays 0); the factor scales every ``avg.ema_tracks`` decay
    set so far (the preset's) the same way, and later ``--set`` values are taken as given, as for
    ``avg.ema_decay``."""
    try:
        current = get_value(cfg, dotted)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [scale] {exc}") from None
    if isinstance(current, bool) or not isinstance(current, (int, float)) or isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"{source}: [scale] {dotted} must name a numeric setting and a numeric factor")
    if dotted == "avg.ema_decay":
        set_value(cfg, dotted, 0.0 if current == 0 else max(0.0, 1.0 - (1.0 - current) / factor))
        # parallel EMA tracks (issue 16) are scaled with it, each through its own horizon
        cfg.avg.ema_tracks = [max(1e-6, 1.0 - (1.0 - d) / factor) for d in cfg.avg.ema_tracks]
    elif isinstance(current, int):
        set_value(cfg, dotted, 0 if current == 0 else max(1, round(current * factor)))
    else:
        set_value(cfg, dotted, current * factor)


def apply_table(cfg: RunConfig, table: dict[str, Any], source: str) -> None:
    """Apply a parsed TOML table ``{section: {key: value}}`` (preset, profile or saved config);
    a ``[scale]`` table multiplies existing numeric values instead of setting them."""
    for section, values in table.items():
        if section in _META_KEYS or section in ("preset", "profile"):
            continue
        if section == "scale" and isinstance(values, dict):
            for dotted, factor in values.items():
                scale_value(cfg, dotted, factor, source)
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None


def parse_set_args(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out.append((key.strip(), _parse_scalar(raw.strip())))
    return out


def load_config(
    preset: str = "baseline",
    profile: str | None = None,
    overrides: list[tuple[str, Any]] | None = None,
) -> RunConfig:
    cfg = RunConfig(preset=preset, profile=profile or "none")
    apply_table(cfg, read_recipe("presets", preset), f"preset {preset}")
    if profile:
        apply_table(cfg, read_recipe("profiles", profile), f"profile {profile}")
    for key, value in overrides or []:
        set_value(cfg, key, value)
    return cfg.validate()


# ------------------------------------------------------------------------------------------------
# serialisation


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict`` output (e.g. the config stored in an artifact)."""
    cfg = RunConfig(preset=str(data.get("preset", "baseline")), profile=str(data.get("profile", "none")))
    apply_table(cfg, {k: v for k, v in data.items() if k in SECTIONS}, "saved config")
    return cfg.validate()


def diff_from_defaults(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Only the keys that differ from the dataclass defaults, by section."""
    base = to_dict(RunConfig())
    cur = to_dict(cfg)
    return {
        s: {k: v for k, v in cur[s].items() if base[s][k] != v}
        for s in SECTIONS
        if any(base[s][k] != v for k, v in cur[s].items())
    }
