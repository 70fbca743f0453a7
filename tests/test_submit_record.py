"""`pgolf seeds` -> `pgolf record` -> `pgolf audit` on real (tiny) CPU runs.

One record folder is made per module from three real seed runs; the audit must pass on it, and
every audit rule must fail on a copy with one planted violation."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main as cli
from pgolf.config import load_config
from pgolf.submit.audit import RULE_NAMES, audit
from pgolf.submit.audit import main as audit_main
from pgolf.submit.bundle import read_bundle
from pgolf.train.codesize import render
from pgolf.submit.record import RecordError, SUBMISSION_FIELDS, check_same_config, load_run
from pgolf.submit.seeds import SeedsError, run_seeds
from tests.test_submit_bundle import TINY, make_tiny_data, tiny_set_args

SEEDS = (1337, 42, 2025)
# The module fixture trains three real runs and bundles them (~30 s); the audits take seconds each.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(data folder, seed runs folder, record folder, printed output of seeds + record)."""
    root = tmp_path_factory.mktemp("record")
    data = make_tiny_data(root / "data")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["seeds", "--preset", "baseline", "--profile", "cpu", *tiny_set_args(), "--seeds", ",".join(map(str, SEEDS)),
                    "--data", str(data), "--out", str(root / "seeds")]) == 0
        runs = [str(root / "seeds" / f"seed_{s}") for s in SEEDS]
        assert cli(["record", *runs, "--name", "tiny-baseline", "--author", "Ada L", "--github-id", "adal",
                    "--blurb", "A tiny CPU record.", "--date", "2026-01-02", "--out", str(root / "rec"), "--no-verify"]) == 0
    return data, root / "seeds", root / "rec", buf.getvalue()


def test_seeds_prints_per_seed_statistics(made):
    _, seeds, _, printed = made
    assert "new: n=3" in printed and "seeds 1337, 42, 2025" in printed
    for s in SEEDS:
        assert (seeds / f"seed_{s}" / "summary.json").is_file()


def test_seeds_keeps_finished_runs_and_refuses_other_configs(made):
    data, seeds, _, _ = made
    cfg = load_config("baseline", "cpu", TINY + [("data.path", str(data))])
    assert run_seeds(cfg, [1337], seeds) == [seeds / "seed_1337"]  # finished: kept, not retrained
    other = load_config("baseline", "cpu", TINY + [("data.path", str(data)), ("train.iterations", 4)])
    with pytest.raises(SeedsError, match="train.iterations"):
        run_seeds(other, [1337], seeds)


def test_record_folder_contents_and_submission_schema(made):
    _, seeds, rec, _ = made
    names = sorted(p.name for p in rec.iterdir())
    assert names == sorted(["README.md", "submission.json", "requirements.txt", "train_gpt.py", "loss_curves.png"]
                           + [f"train_seed{s}.log" for s in SEEDS])
    sub = json.loads((rec / "submission.json").read_text())
    for key, typ in SUBMISSION_FIELDS.items():
        assert isinstance(sub[key], typ), key
    assert (sub["author"], sub["github_id"], sub["name"], sub["date"]) == ("Ada L", "adal", "tiny-baseline", "2026-01-02")
    per_seed = sub["seed_results"]
    assert [s["seed"] for s in per_seed] == list(SEEDS)
    assert sub["val_bpb"] == pytest.approx(np.mean([s["val_bpb"] for s in per_seed]), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(np.std([s["val_bpb"] for s in per_seed], ddof=1))
    assert sub["bytes_code"] == (rec / "train_gpt.py").stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + max(s["model_bytes"] for s in per_seed)
    for s in SEEDS:  # the logs are the runs' own logs
        assert (rec / f"train_seed{s}.log").read_text() == (seeds / f"seed_{s}" / "log.txt").read_text()
    readme = (rec / "README.md").read_text()
    assert f"**val_bpb {sub['val_bpb']:.8f}**" in readme and f"{sub['val_bpb_std']:.8f}" in readme
    assert all(f"| {s} | 3 |" in readme for s in SEEDS) and "SEED=1337 python train_gpt.py" in readme
    assert f"{sub['bytes_total']:,} bytes" in readme and "loss_curves.png" in readme
    reqs = (rec / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("sentencepiece==") for r in reqs)
    png = (rec / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    config, _ = read_bundle(rec / "train_gpt.py")
    assert config["train"]["seed"] == 1337 if "seed" in config.get("train", {}) else True


def test_record_refuses_runs_of_different_configurations(made, tmp_path):
    _, seeds, _, _ = made
    odd = tmp_path / "odd"
    shutil.copytree(seeds / "seed_42", odd)
    log = (odd / "log.txt").read_text().replace('"num_layers": 2', '"num_layers": 3').replace("seed:42", "seed:7")
    (odd / "log.txt").write_text(log)
    with pytest.raises(RecordError, match="model.num_layers"):
        check_same_config([load_run(seeds / "seed_1337"), load_run(odd)])
    with pytest.raises(RecordError, match="seeds repeat"):
        check_same_config([load_run(seeds / "seed_42"), load_run(seeds / "seed_42")])


def test_clean_record_passes_every_rule(made, capsys):
    _, _, rec, _ = made
    rules = audit(rec)
    assert [r.name for r in rules] == list(RULE_NAMES)
    assert all(r.status == "PASS" for r in rules), [(r.name, r.status, r.reason) for r in rules if r.status != "PASS"]
    assert audit_main([str(rec), "--skip", "causality"]) == 0
    out = capsys.readouterr().out
    assert "audit: 13 pass, 0 fail, 1 skipped -> PASS" in out and "limit defined for 8xH100" in out


# ------------------------------------------------------------------------------------------------
# planted violations: each must make its own rule fail


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_bytes().decode("latin-1")  # byte-preserving for any file (a bundle may be latin-1)
    assert old in text, f"{old!r} not in {path}"
    path.write_bytes(text.replace(old, new, count).encode("latin-1"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v(data[k]) if callable(v) else v
    path.write_text(json.dumps(data))


def _rerender(rec: Path, config_change=None, module_change=None) -> None:
    config, modules = read_bundle(rec / "train_gpt.py")
    if config_change:
        config_change(config)
    if module_change:
        module_change(modules)
    (rec / "train_gpt.py").write_bytes(render(modules, config, "lzma"))


def _plant_leak(rec: Path, data: Path) -> Path:
    """A copy of the data folder whose training shard also holds a validation document."""
    from pgolf.data.manifest import iter_documents
    from pgolf.data.shards import read_shard, write_shard

    leaky = rec.parent / "leaky_data"
    shutil.copytree(data, leaky)
    val_doc = next(iter_documents([read_shard(leaky / "fineweb_val_000000.bin")]))
    train = read_shard(leaky / "fineweb_train_000000.bin")
    write_shard(leaky / "fineweb_train_000000.bin", np.concatenate([train, [1], val_doc]).astype(np.uint16))
    return leaky


def _last_step_time(rec: Path) -> None:
    log = rec / "train_seed42.log"
    last = [line for line in log.read_text().splitlines() if line.startswith("step:")][-1]
    _edit(log, last, re.sub(r"train_time:\d+ms", "train_time:700000ms", last))


PLANTS = {
    "files": lambda rec, data: (rec / "requirements.txt").unlink(),
    "submission": lambda rec, data: _edit_json(rec / "submission.json", github_id=None),
    "seeds": lambda rec, data: shutil.copy(rec / "train_seed42.log", rec / "train_seed43.log"),
    "code bytes": lambda rec, data: _edit(rec / "train_gpt.py", "\n", "\n\n"),
    "bytes total": lambda rec, data: _edit_json(rec / "submission.json", bytes_total=lambda v: v - 1),
    "cap": lambda rec, data: [_edit(rec / f"train_seed{s}.log", "Serialized model int8_zlib: ", "Serialized model int8_zlib: 159") for s in SEEDS],
    "train time": lambda rec, data: _last_step_time(rec),
    "eval time": lambda rec, data: _edit(rec / "train_seed1337.log", re.search(r"final_\S+_roundtrip .*eval_time:(\d+)ms", (rec / "train_seed1337.log").read_text()).group(0),
                                         re.sub(r"eval_time:\d+ms", "eval_time:650000ms", re.search(r"final_\S+_roundtrip .*eval_time:(\d+)ms", (rec / "train_seed1337.log").read_text()).group(0))),
    "one config": lambda rec, data: _edit(rec / "train_seed2025.log", '"num_layers": 2', '"num_layers": 3'),
    "script config": lambda rec, data: _rerender(rec, config_change=lambda c: c["train"].__setitem__("iterations", 4)),
    "score": lambda rec, data: _edit_json(rec / "submission.json", val_bpb=lambda v: v + 1e-4),
    "full val": lambda rec, data: _edit(rec / "train_seed42.log", " tokens:", " tokens:1"),
    "disjoint": lambda rec, data: _plant_leak(rec, data),
    "causality": lambda rec, data: _rerender(rec, module_change=lambda m: m.__setitem__(
        "pgolf.model.attention", m["pgolf.model.attention"].replace("is_causal=True", "is_causal=False"))),
}


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_each_rule_fails_on_its_planted_violation(made, tmp_path, rule):
    data, _, clean, _ = made
    rec = tmp_path / "rec"
    shutil.copytree(clean, rec)
    leaky = PLANTS[rule](rec, data)
    skip = () if rule == "causality" else ("causality",)
    rules = {r.name: r for r in audit(rec, data=leaky if rule == "disjoint" else None, skip=skip)}
    assert rules[rule].status == "FAIL", (rule, rules[rule].reason)
    assert rules[rule].reason
    args = [str(rec)] + (["--data", str(leaky)] if rule == "disjoint" else []) + [a for s in skip for a in ("--skip", s)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert audit_main(args) == 1
