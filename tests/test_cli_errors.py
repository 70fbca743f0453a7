"""Bad input to `pgolf train` / `pgolf eval` / `pgolf inspect`: a one-line error that names the
file or key and the fix, exit code 2, no traceback, and nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.cli import main
from tests.conftest import REPO, tiny_set_args


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def _train(demo_dir, out, extra=None, data=None):
    return ["train", "--preset", "baseline", "--profile", "cpu", "--data", str(data or demo_dir), "--out", str(out)] + tiny_set_args(extra)


def test_unknown_preset(capsys, tmp_path, demo_dir):
    argv = _train(demo_dir, tmp_path / "r")
    argv[argv.index("baseline")] = "pr999"
    _assert_one_line_error(*_run_cli(argv, capsys), "unknown preset 'pr999'", "pr401")


def test_unknown_key(capsys, tmp_path, demo_dir):
    _assert_one_line_error(*_run_cli(_train(demo_dir, tmp_path / "r", [("model.depth", 3)]), capsys), "model.depth", "num_layers")


def test_tokenizer_vocab_mismatch(capsys, tmp_path, demo_dir):
    code, err = _run_cli(_train(demo_dir, tmp_path / "r", [("model.vocab_size", 512)]), capsys)
    _assert_one_line_error(code, err, "1024", "512")


def test_empty_glob(capsys, tmp_path, demo_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(*_run_cli(_train(demo_dir, tmp_path / "r", data=empty), capsys), str(empty), "pgolf data prepare")


def test_corrupt_shard(capsys, tmp_path, demo_dir):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    shard = sorted(data.glob("fineweb_train_*.bin"))[0]
    with open(shard, "r+b") as f:
        f.write(b"\x00\x00\x00\x00")  # wrong magic
    _assert_one_line_error(*_run_cli(_train(demo_dir, tmp_path / "r", data=data), capsys), shard.name, "magic")


def test_truncated_shard(capsys, tmp_path, demo_dir):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    shard = sorted(data.glob("fineweb_val_*.bin"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    _assert_one_line_error(*_run_cli(_train(demo_dir, tmp_path / "r", data=data), capsys), shard.name, "truncated")


def test_validation_split_too_short(capsys, tmp_path, demo_dir):
    code, err = _run_cli(_train(demo_dir, tmp_path / "r", [("eval.max_val_tokens", 10)]), capsys)
    _assert_one_line_error(code, err, "too short", "sequence length 64")


def test_unwritable_output_folder(capsys, tmp_path, demo_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    _assert_one_line_error(*_run_cli(_train(demo_dir, blocker / "run"), capsys), "cannot write there", "--out")
    assert blocker.read_text() == "not a folder"  # nothing lost


def test_eval_rejects_a_pickle_file(capsys, tmp_path, demo_dir):
    import torch

    fake = tmp_path / "final_model.pt"
    torch.save({"w": torch.zeros(2)}, fake)
    argv = ["eval", "--artifact", str(fake), "--val", str(demo_dir / "fineweb_val_*.bin"), "--tokenizer", str(demo_dir / "pgolf_1024_bpe.model")]
    _assert_one_line_error(*_run_cli(argv, capsys), "not a pgolf artifact", "never unpickles")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    """The installed console path: exit code 2 and a single stderr line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pgolf", "inspect", "--preset", "nope"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown preset")
    assert "Traceback" not in proc.stderr


def test_inspect_preset_json_matches_the_submissions(capsys):
    import json

    for preset, n in {"baseline": 17_059_912, "pr89": 21_778_504, "pr201": 26_829_913, "pr401": 26_993_756}.items():
        assert main(["inspect", "--preset", preset, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["params"] == n == rep["expected_params"]
        assert sum(rep["params_by_group"].values()) == n
