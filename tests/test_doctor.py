"""`pgolf doctor`: the machine's offer and a preset's choices, as key: value lines or one JSON object."""

from __future__ import annotations

import json
import shutil

import torch

from pgolf.cli import main


def test_doctor_json_cpu_profile(capsys):
    assert main(["doctor", "--preset", "pr401", "--profile", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    m, r = rep["machine"], rep["run"]
    assert m["torch"] == torch.__version__
    assert m["cuda_available"] is torch.cuda.is_available()
    assert m["gloo_available"] is True
    assert m["nccl_available"] is torch.distributed.is_nccl_available()
    assert m["lrzip"] == shutil.which("lrzip")
    assert m["cpu_count"] >= 1
    # the compile probe ran: usable, or the reason in one line
    assert isinstance(m["torch_compile"], bool) and m["torch_compile_detail"] and "\n" not in m["torch_compile_detail"]
    # the cpu profile's choices: CPU, SDPA, no compile, bf16 autocast only with native bf16, gloo
    from pgolf.train.setup import cpu_native_bf16

    assert r == {**r, "preset": "pr401", "profile": "cpu", "device": "cpu", "attention_backend": "sdpa",
                 "compile": False, "autocast": "bfloat16" if cpu_native_bf16() else "off"}
    assert r["autocast_reason"].startswith("auto:")
    assert r["distributed_backend"].startswith("gloo")


def test_doctor_text_and_8xh100_profile(capsys):
    assert main(["doctor", "--preset", "pr1855", "--profile", "8xh100", "--no-compile-check"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    kv = dict(line.split(": ", 1) for line in lines)
    assert all(": " in line for line in lines)
    assert kv["machine.gloo_available"] == "True"
    assert kv["run.compile"] == "True" and kv["run.autocast"] == "bfloat16"
    if not torch.cuda.is_available():
        assert kv["machine.cuda_available"] == "False"
        assert kv["run.device"] == "unavailable" and "no CUDA device" in kv["run.device_error"]
        assert kv["run.attention_backend"].startswith("pytorch document masking")  # R7's doc-masked attention
    assert kv["run.distributed_backend"].startswith("nccl")  # the profile asks for CUDA


def test_doctor_bad_input(capsys):
    assert main(["doctor", "--compile-timeout", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --compile-timeout")
    assert main(["doctor", "--preset", "pr999", "--no-compile-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pr999" in err[0]


def test_cpu_native_bf16_reads_the_flags():
    from pgolf.train.config import TrainConfig
    from pgolf.train.setup import autocast_dtype, cpu_native_bf16

    assert cpu_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n") is False
    assert cpu_native_bf16("flags\t\t: fpu avx512f avx512_bf16\n") is True
    assert cpu_native_bf16("flags\t\t: fpu amx_tile amx_bf16\n") is True
    assert cpu_native_bf16("") is False
    # explicit settings win over the detection; auto on CUDA is bf16 whatever the host CPU
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(TrainConfig(autocast="bf16"), cpu) is torch.bfloat16
    assert autocast_dtype(TrainConfig(autocast="off"), cuda) is None
    assert autocast_dtype(TrainConfig(autocast="auto"), cuda) is torch.bfloat16
    assert autocast_dtype(TrainConfig(autocast="auto"), cpu) is (torch.bfloat16 if cpu_native_bf16() else None)


def test_compile_cache_is_persistent_unless_the_user_chose_one(monkeypatch, tmp_path):
    from pgolf.train.setup import persistent_compile_cache

    monkeypatch.setenv("PGOLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert persistent_compile_cache() == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == str(tmp_path / "mine")
