"""`pgolf bundle`: the generated single-file train_gpt.py (pgolf.submit.bundle, pgolf.submit.entry)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pgolf.cli import main as cli
from pgolf.config import load_config
from pgolf.submit.bundle import BundleError, read_bundle
from pgolf.train.codesize import WRAPPERS, render, shake

REPO = Path(__file__).resolve().parents[1]

# A baseline run small enough for seconds on a CPU (every stage of a real run).
TINY = [
    ("model.vocab_size", 512), ("model.num_layers", 2), ("model.model_dim", 64), ("model.num_heads", 4),
    ("model.num_kv_heads", 2), ("train.iterations", 3), ("train.max_wallclock_seconds", 0.0),
    ("train.train_seq_len", 64), ("train.train_batch_tokens", 512), ("train.train_log_every", 1),
    ("train.progress", False), ("train.autocast", "off"), ("eval.val_batch_tokens", 4096),
]


def tiny_set_args() -> list[str]:
    out = []
    for k, v in TINY:
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def make_tiny_data(folder: Path) -> Path:
    """A prepared data folder (shards, a 512-piece tokenizer, manifest with doc hashes) of synthetic words."""
    from pgolf.data.prepare import prepare_dataset

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 300))) + "." for _ in range(400)]
    src = folder.parent / f"{folder.name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset(src, folder, train_tokenizer=True, vocab_size=512, val_docs=40, progress=False)
    return folder


def isolated_env(**extra: str) -> dict[str, str]:
    """Environment for `python -S`: only the third-party site-packages on the path, so the editable
    pgolf install (a .pth file, processed by site) cannot be imported."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": os.pathsep.join(paths)}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# unit: shaking and packing


def test_shake_drops_unreachable_definitions_and_their_imports():
    sources = {
        "pgolf.a": "from pgolf.b import used, unused\nX = 1\ndef main():\n    return used() + getattr(X, 'by_name', 0)\ndef dead():\n    return unused()\n",
        "pgolf.b": "def used():\n    return helper()\ndef helper():\n    return 1\ndef unused():\n    return 2\ndef by_name():\n    return 3\nclass Dead:\n    pass\n",
    }
    out = shake(sources, {"main"})
    assert "def dead" not in out["pgolf.a"] and "unused" not in out["pgolf.a"]  # the import lost the name too
    assert "def used" in out["pgolf.b"] and "def helper" in out["pgolf.b"] and "def by_name" in out["pgolf.b"]
    assert "def unused" not in out["pgolf.b"] and "class Dead" not in out["pgolf.b"]



def test_shake_counts_attributes_of_modules_only_for_that_module():
    sources = {
        "pgolf": "",
        "pgolf.a": ("import pgolf.d\nfrom pgolf import c as cc\n"
                    "def main(b):\n    return cc.encode(b.decode()) + pgolf.d.run(b.run)\n"),
        "pgolf.c": "def encode(x):\n    return x\ndef decode(x):\n    return x\ndef run():\n    return 0\n",
        "pgolf.d": "def run(x):\n    return x\ndef decode():\n    return 1\n",
    }
    out = shake(sources, {"main"})
    assert "def encode" in out["pgolf.c"] and "def run" in out["pgolf.d"]  # cc.encode, pgolf.d.run
    assert "def decode" not in out["pgolf.c"] and "def decode" not in out["pgolf.d"]  # b.decode() is a bytes method
    assert "def run" not in out["pgolf.c"]  # pgolf.d.run and b.run do not keep pgolf.c.run


def test_probe_data_follows_the_configs_transform(tmp_path):
    from pgolf.data.loaders import check_transform
    from pgolf.data.manifest import read_manifest
    from pgolf.data.sidecar import sidecar_path
    from pgolf.submit.seeds import make_probe_data

    data, tok = make_probe_data(tmp_path / "cops", 1024, "lossless_caps_caseops_v1")
    assert read_manifest(data)["transform"]["name"] == "lossless_caps_caseops_v1" and tok.is_file()
    check_transform(data, "lossless_caps_caseops_v1")  # what a CaseOps run checks before training
    val = sorted(data.glob("fineweb_val_0*.bin"))
    assert val and all(sidecar_path(v).is_file() for v in val)


FAKE = {
    "pgolf": "VERSION = 'fake'",
    "pgolf.submit": "",
    "pgolf.submit.entry": (
        "import sys\nfrom importlib import resources\n"
        "def main(config, script):\n"
        "    import pgolf\n"
        "    print('ran', config['k'], pgolf.VERSION, resources.files('pgolf').joinpath('data', 'x.toml').read_text())\n"
        "    try:\n        import pgolf.model\n    except ImportError as exc:\n        print('refused', exc)\n"
    ),
    "pgolf/data/x.toml": "a = 1",
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_every_wrapper_runs_its_embedded_code_only(tmp_path, wrapper):
    data = render(FAKE, {"k": "v"}, wrapper, "header")
    script = tmp_path / "train_gpt.py"
    script.write_bytes(data)
    if wrapper.endswith("-latin1"):  # binary-looking, but a valid source file that names its encoding
        assert data.startswith(b"# header; coding: latin-1\n") and not data.isascii()
    else:
        assert data.isascii() and data.startswith(b"# header\n")
    assert read_bundle(script) == ({"k": "v"}, FAKE)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ran v fake a = 1" in out.stdout  # the embedded pgolf, not the installed one
    assert "refused pgolf.model is not in this bundle" in out.stdout  # never falls back to the installed pgolf


def test_read_bundle_rejects_other_files(tmp_path):
    (tmp_path / "train_gpt.py").write_text("print('hello')\n")
    with pytest.raises(BundleError, match="not a file made by pgolf bundle"):
        read_bundle(tmp_path / "train_gpt.py")


# ------------------------------------------------------------------------------------------------
# the real thing: bundle a configuration, run the file standalone


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """(data folder, a verified bundle of the tiny baseline, the `pgolf bundle` output)."""
    root = tmp_path_factory.mktemp("bundle")
    data = make_tiny_data(root / "data")
    out = root / "out" / "train_gpt.py"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["bundle", "--preset", "baseline", "--profile", "cpu", *tiny_set_args(), "--out", str(out)]) == 0
    return data, out, buf.getvalue()


@pytest.mark.slow  # the module fixture bundles (a probe and a verification run), ~15-30 s
def test_bundle_command_reports_the_bytes_of_a_verified_file(bundled):
    data, script, printed = bundled
    size = script.stat().st_size
    assert f"code bytes: {size}" in printed and "verified by a run" in printed
    config, modules = read_bundle(script)
    assert config["preset"] == "baseline" and config["data"]["path"] == "./data/datasets/fineweb10B_sp512"
    assert "pgolf.submit.entry" in modules and "pgolf.train.loop" in modules
    for unused in ("pgolf.optim.normuon", "pgolf.quant.qat", "pgolf.data.prepare", "pgolf.cli", "pgolf.submit.bundle"):
        assert unused not in modules  # techniques the baseline does not use, and the tooling
    assert size < sum(len(s) for s in modules.values())  # compressed pays


@pytest.mark.slow  # the module fixture bundles (a probe and a verification run), ~15-30 s
def test_bundle_runs_standalone_outside_the_repository(bundled, tmp_path):
    data, script, _ = bundled
    work = tmp_path / "submission"
    work.mkdir()
    shutil.copy(script, work / "train_gpt.py")
    assert not str(work).startswith(str(REPO))
    env = isolated_env(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "pgolf_512_bpe.model"), SEED="7", RUN_ID="solo")
    probe = subprocess.run([sys.executable, "-S", "-c", "import pgolf"], cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pgolf'" in probe.stderr  # the package is not reachable
    out = subprocess.run([sys.executable, "-S", "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = work / "logs" / "solo"
    log = (run / "log.txt").read_text()
    size = (work / "train_gpt.py").stat().st_size
    assert "code_source:bundle" in out.stdout
    assert "step:1/3 train_loss:" in log and "step:3/3 train_loss:" in log  # it trains
    assert (run / "final_model.pgolf").is_file() and "final_int8_zlib_roundtrip_exact" in log  # artifact + round trip
    assert f"Code size: {size} bytes" in log  # its own size is the code size
    summary = json.loads((run / "summary.json").read_text())
    assert summary["code_bytes"] == size and summary["seed"] == 7  # SEED from the environment


@pytest.mark.slow
def test_bundle_runs_under_torchrun_with_two_cpu_processes(bundled, tmp_path):
    data, script, _ = bundled
    shutil.copy(script, tmp_path / "train_gpt.py")
    env = {**os.environ, "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "pgolf_512_bpe.model"), "RUN_ID": "ddp", "OMP_NUM_THREADS": "1"}
    for k in [k for k in env if k.startswith("PGOLF_") and k != "PGOLF_CACHE"]:
        env.pop(k)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    log = (tmp_path / "logs" / "ddp" / "log.txt").read_text()
    assert "world_size:2" in log and "step:3/3 train_loss:" in log
    assert f"Code size: {(tmp_path / 'train_gpt.py').stat().st_size} bytes" in log
    assert (tmp_path / "logs" / "ddp" / "final_model.pgolf").is_file()


@pytest.mark.slow  # the module fixture bundles (a probe and a verification run), ~15-30 s
def test_package_code_bytes_bounds_the_bundle(bundled):
    from pgolf.train.codesize import package_code_bytes
    import pgolf.eval.suite  # noqa: F401  (what a run has loaded)
    import pgolf.train.loop  # noqa: F401

    _, script, _ = bundled
    cfg = load_config("baseline", "cpu", TINY)
    estimate = package_code_bytes(cfg)
    assert script.stat().st_size <= estimate < 4 * script.stat().st_size


def test_latin1_literal_round_trips_every_byte(tmp_path):
    """Every byte value (and a random tail) survives the latin-1 literal through CPython's own
    tokenizer, and only the five bytes that cannot stand for themselves are escaped."""
    from pgolf.train.codesize import LATIN1_COOKIE, latin1_literal

    blob = bytes(range(256)) * 3 + np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    script = tmp_path / "t.py"
    script.write_bytes(f"# {LATIN1_COOKIE}\nimport sys;sys.stdout.write('{latin1_literal(blob)}'.encode('latin-1').hex())\n".encode("latin-1"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == blob
    assert len(latin1_literal(bytes(range(256)))) == 256 + 7  # NUL +3, LF CR ' \ +1 each


def test_package_code_bytes_is_the_entry_points_closure_not_the_process_history(demo_dir, tmp_path):
    """The estimate is a function of the config only: a fresh process that trained a tiny run
    (so it loaded exactly what a run loads) and this test process, which has imported tooling a run
    never loads, count the same bytes; and every pgolf module the run loaded is in the counted set
    (nothing is imported by a computed name), so the count bounds what the run needs."""
    from pgolf.train import codesize
    import pgolf.submit.ablate  # noqa: F401  (loaded in a sweep's or a test's process, never by a run)

    probe = (
        "import sys\n"
        "from pgolf.cli import main\n"
        f"rc = main(['train', '--preset', 'baseline', '--profile', 'cpu', '--data', {str(demo_dir)!r}, '--out', {str(tmp_path / 'run')!r},"
        " '--set', 'model.num_layers=2', '--set', 'model.model_dim=64', '--set', 'model.num_heads=4', '--set', 'model.num_kv_heads=2',"
        " '--set', 'train.iterations=2', '--set', 'train.train_seq_len=64', '--set', 'train.train_batch_tokens=512',"
        " '--set', 'eval.max_val_tokens=1024', '--set', 'train.progress=false'])\n"
        "assert rc == 0\n"
        "from pgolf.train.codesize import package_code_bytes\n"
        "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] == 'pgolf')))\n"
        "print(package_code_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    loaded_line, count_line = out.stdout.strip().splitlines()[-2:]
    assert int(count_line) == codesize.package_code_bytes()
    closure = codesize.import_closure(set(codesize.ALWAYS))
    loaded = {n for n in loaded_line.split() if not n.startswith(("pgolf.cli", *codesize.TOOLING))}
    assert loaded <= closure, sorted(loaded - closure)
