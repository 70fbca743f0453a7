"""`pgolf bundle`'s config folding (pgolf.train.fold): planted code, and a folded bundle that
trains exactly as the unfolded one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.config import RunConfig, from_dict, load_config
from pgolf.errors import ConfigError
from pgolf.submit.bundle import live_settings
from pgolf.train.fold import fold_sources
from pgolf.train.codesize import module_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_submit_bundle import TINY, make_tiny_data  # noqa: E402

PLANTED = {
    "pgolf": "",
    "pgolf.t": '''
from pgolf.config import RunConfig
from pgolf.u import looped, qat_only


def main(cfg: RunConfig):
    out = []
    if cfg.model.num_loops > 0:
        out.append(looped())
    else:
        out.append("never taken")
    if cfg.quant.qat != "off":
        from pgolf.v import lazy_qat

        out.append(qat_only() + lazy_qat())
    n = cfg.model.num_loops * 10
    if n != 20:
        raise ValueError("the loop count changed")
    return out, cfg.train.seed, cfg.model.tanh_reparam, Runner(cfg).go(), Runner(cfg).go2(), n


def tweak(mc):
    mc.tanh_reparam = 0.5  # assigned somewhere: never folded


class Runner:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.loops = cfg.model.num_loops > 0

    def go(self):
        if self.loops:
            return "loops"
        return "no loops"

    def go2(self):
        q = self.cfg.quant
        return "qat" if q.qat != "off" and q.qat_threshold > 0 else "plain"
''',
    "pgolf.u": '''
def looped():
    return "looped"


def qat_only():
    return helper_of_qat()


def helper_of_qat():
    return "qat"
''',
    "pgolf.v": "def lazy_qat():\n    return 'lazy'\n",
}


def planted_config() -> RunConfig:
    cfg = RunConfig()
    cfg.model.num_loops, cfg.model.loop_start, cfg.model.loop_end = 2, 1, 2
    cfg.quant.qat = "off"
    return cfg.validate()


def fold_planted(live=("train.seed",), extra=None):
    sources = {**PLANTED, **(extra or {})}
    return fold_sources(sources, planted_config(), set(live), {"main"}, {"pgolf", "pgolf.t", *(extra or {})})


def defs(src: str) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_constant_branches_fold_and_what_only_they_reached_goes():
    out, report = fold_planted()
    t = out["pgolf.t"]
    assert "looped()" in t and "num_loops > 0" not in t  # the constant-true branch is kept, without its test
    assert "never taken" not in t  # its else branch goes
    assert "qat_only" not in t and "lazy_qat" not in t  # the constant-false branch goes, with its imports
    assert defs(out["pgolf.u"]) == {"looped"}  # functions only that branch called go too (transitively)
    assert "pgolf.v" not in out and report.dropped_modules == ("pgolf.v",)  # and a module only it imported
    assert "the loop count changed" not in t  # n = 2 * 10 is a constant: the check cannot fail
    assert "return 'loops'" in t and "no loops" not in t  # self.loops, assigned once in __init__
    assert "'plain'" in t and "'qat'" not in t  # a config section through a typed local, and a short-circuit


def test_live_and_assigned_settings_stay_reads():
    t = fold_planted()[0]["pgolf.t"]
    assert "cfg.train.seed" in t  # live: the script takes it from the environment (SEED)
    assert "cfg.model.tanh_reparam" in t  # assigned by bundled code (tweak): never folded
    folded_seed = fold_planted(live=())[0]["pgolf.t"]
    assert "cfg.train.seed" not in folded_seed and "1337" in folded_seed  # the same read, folded when not live


def test_folded_planted_code_returns_what_the_original_returns():
    folded, _ = fold_planted()
    results = []
    for sources in (PLANTED, folded):
        namespaces: dict[str, dict] = {}

        def load(name, sources=sources, namespaces=namespaces):
            if name not in namespaces:
                ns = namespaces[name] = {"__name__": name}
                exec(compile(sources[name], name, "exec"), ns)
            return namespaces[name]

        class Finder:  # serves the planted modules
            @staticmethod
            def find_spec(name, path=None, target=None):
                import importlib.util

                if name in ("pgolf.u", "pgolf.v"):
                    return importlib.util.spec_from_loader(name, Loader())
                return None

        class Loader:
            def create_module(self, spec):
                return None

            def exec_module(self, module):
                module.__dict__.update(load(module.__name__))

        saved = {k: sys.modules.pop(k) for k in ("pgolf.u", "pgolf.v") if k in sys.modules}
        sys.meta_path.insert(0, Finder)
        try:
            results.append(load("pgolf.t")["main"](planted_config()))
        finally:
            sys.meta_path.remove(Finder)
            for k in ("pgolf.u", "pgolf.v"):
                sys.modules.pop(k, None)
            sys.modules.update(saved)
    assert results[0] == results[1] == (["looped"], 1337, 0.0, "loops", "plain", 20)


def test_config_classes_keep_every_field_and_the_script_refuses_folded_variables():
    extra = {n: module_source(n) for n in ("pgolf.model.config", "pgolf.config.envvars")}
    extra["pgolf.w"] = "from pgolf.model.config import ModelConfig\nMODEL = ModelConfig()\n"  # keeps the class
    out, report = fold_planted(live=("train.seed", "data.path"), extra=extra)
    model = out["pgolf.model.config"]
    assert "num_loops: int = 0" in model and "tanh_reparam: float = 0.0" in model  # to_dict stays complete
    tree = ast.parse(out["pgolf.config.envvars"])
    live = next(ast.literal_eval(st.value) for st in tree.body if isinstance(st, ast.AnnAssign) and ast.unparse(st.target) == "LIVE")
    assert "model.tanh_reparam" in live and "model.num_loops" not in live  # assigned: live; folded: not
    assert "train.seed" not in live and "train.seed" in report.live  # challenge settings: CHALLENGE_ENV says so
    assert set(live) <= set(report.live)


def test_a_variable_for_a_folded_setting_is_an_error(monkeypatch):
    from pgolf.config import envvars

    monkeypatch.setattr(envvars, "LIVE", ("train.device",))
    assert envvars.resolve_env({"SEED": "3"}) == [("SEED", "train.seed", "3")]  # a challenge setting
    assert envvars.resolve_env({"PGOLF_TRAIN_SEED": "3"}) == [("PGOLF_TRAIN_SEED", "train.seed", "3")]  # either name
    assert envvars.resolve_env({"PGOLF_TRAIN_DEVICE": "cpu"}) == [("PGOLF_TRAIN_DEVICE", "train.device", "cpu")]
    with pytest.raises(ConfigError, match="quant.qat is built into this script"):
        envvars.resolve_env({"PGOLF_QUANT_QAT": "late"})
    monkeypatch.setattr(envvars, "LIVE", None)  # the package: every setting
    assert envvars.resolve_env({"PGOLF_QUANT_QAT": "late"}) == [("PGOLF_QUANT_QAT", "quant.qat", "late")]


def test_live_settings_cover_the_challenge_variables_and_the_verification_run():
    from pgolf.config.envvars import CHALLENGE_ENV
    from pgolf.submit.seeds import probe_overrides

    cfg = load_config("pr1855")
    live = live_settings(cfg)
    assert set(CHALLENGE_ENV.values()) <= live and set(probe_overrides(cfg)) <= live
    assert {"train.seed", "data.path", "train.max_wallclock_seconds", "train.device", "train.compile"} <= live


# ------------------------------------------------------------------------------------------------
# a real bundle, folded and not, run on the same data


_TIMES = re.compile(r"\s(train_time|step_avg|eval_time|score_time|sgd_time|seconds|gptq_seconds|train_time_with_gptq):\S+")


def _comparable(log: str) -> list[str]:
    """The log lines that state results, without timings and without the artifact's file size (its
    metadata records the code bytes, which folding changes)."""
    keep = ("train_loss:", "val_loss:", "_exact", "Serialized model")
    lines = [_TIMES.sub("", line) for line in log.splitlines() if any(k in line for k in keep)]
    return [re.sub(r"^(Serialized model \S+) \d+ bytes", r"\1", line) for line in lines]


@pytest.mark.slow  # a probe and two 3-step runs of the tiny baseline, ~40-60 s
def test_folded_bundle_trains_exactly_as_the_unfolded_one(tmp_path):
    import torch

    from pgolf.quant.artifact import load_artifact_state
    from pgolf.submit.seeds import clean_env, probe_modules
    from pgolf.train.codesize import bundle_config, pack, prepare_sources

    cfg = load_config("baseline", "cpu", TINY)
    config = bundle_config(cfg)
    data = make_tiny_data(tmp_path / "data")
    tok = data / "pgolf_512_bpe.model"
    used = [m for m in probe_modules(config, {}, data, tok, tmp_path) if m.split(".")[0] == "pgolf"]
    plain, _ = prepare_sources(used)
    folded, _ = prepare_sources(used, fold=from_dict(config), live=live_settings(cfg))
    assert sum(map(len, folded.values())) < 0.9 * sum(map(len, plain.values()))
    logs, artifacts = [], []
    for name, modules in (("plain", plain), ("folded", folded)):
        work = tmp_path / name
        work.mkdir()
        (work / "train_gpt.py").write_bytes(pack(modules, config, "brotli-latin1")[0])
        env = clean_env(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), SEED="5", RUN_ID="run")
        out = subprocess.run([sys.executable, "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "code_source:bundle" in out.stdout
        logs.append(_comparable((work / "logs" / "run" / "log.txt").read_text()))
        meta, state = load_artifact_state(work / "logs" / "run" / "final_model.pgolf")
        artifacts.append(({k: v for k, v in meta.items() if k != "code_bytes"}, state))
    assert logs[0] == logs[1] and any("step:3/3 train_loss:" in line for line in logs[0])
    assert any("final_int8_zlib_roundtrip_exact" in line and "payload:" not in line for line in logs[0])
    assert artifacts[0][0] == artifacts[1][0]  # the same metadata (the code bytes aside)
    (_, a), (_, b) = artifacts
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # and the same quantised weights
