"""The demo corpus's other vocabularies and its CaseOps variant (what `pgolf run --preset pr1855`
trains on with no network), and the data.transform check at training start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgolf.config import load_config
from pgolf.data import caseops
from pgolf.data.config import DataConfig
from pgolf.data.demo import demo_for_config, demo_name, prepare_demo
from pgolf.data.loaders import build_loader
from pgolf.data.manifest import read_manifest, verify_files
from pgolf.data.shards import resolve_shards
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import DataError
from pgolf.eval.bpb import ByteLUT, SidecarBytes, load_byte_counter
from pgolf.eval.standard import load_validation_tokens


def test_variant_names_and_the_config_that_picks_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert demo_name() == "demo-v2" and demo_name(8192) == "demo-v2-sp8192" and demo_name(8192, True) == "demo-v2-sp8192-caseops"
    asked = []
    monkeypatch.setattr("pgolf.data.demo.prepare_demo", lambda root, progress, vocab_size, caseops: asked.append((vocab_size, caseops)) or tmp_path)
    for preset, want in (("pr401", (1024, False)), ("pr1218", (4096, False)), ("pr1394", (8192, False)), ("pr1855", (8192, True))):
        demo_for_config(load_config(preset=preset, profile="cpu"))
        assert asked[-1] == want, preset
    cfg = load_config(preset="pr1855", profile="cpu")
    assert cfg.data.loader == "packed" and cfg.model.doc_attention_window == 2048
    assert load_config(preset="pr1218").data.loader == "coprime" and load_config(preset="pr1493").data.loader == "shuffled"


def test_caseops_demo_builds_sidecars_and_the_transform_is_checked(tmp_path: Path, demo_dir: Path) -> None:
    folder = prepare_demo(tmp_path, progress=False, vocab_size=512, caseops=True)
    assert folder.name == "demo-v2-sp512-caseops"
    m = read_manifest(folder)
    assert m["transform"]["name"] == caseops.TRANSFORM_NAME and m["source"]["caseops"] is True
    assert all(r["status"] == "ok" for r in verify_files(folder))
    sp = load_tokenizer(folder / m["tokenizer"]["file"], 512)
    caseops.check_operator_pieces(sp, "demo")
    val = resolve_shards(folder, "fineweb_val_*.bin", "validation")
    tokens = load_validation_tokens(val, 256)
    assert isinstance(load_byte_counter(sp, 512, val, tokens, folder), SidecarBytes)
    assert prepare_demo(tmp_path, progress=False, vocab_size=512, caseops=True) == folder  # cached
    train = resolve_shards(folder, "fineweb_train_*.bin", "training")
    cpu = torch.device("cpu")
    x, _ = build_loader(DataConfig(loader="packed", transform=caseops.TRANSFORM_NAME), train, 0, 1, cpu, doc_window=2048).next_batch(512, 256, 1)
    assert x.shape == (1, 512) and int(x[0, 0]) == 1  # a row starting at a document
    with pytest.raises(DataError, match=r"the data's transform is 'lossless_caps_caseops_v1' but data.transform is 'none'"):
        build_loader(DataConfig(), train, 0, 1, cpu)
    plain = demo_dir  # the sp1024 demo (session fixture)
    with pytest.raises(DataError, match=r"the data's transform is 'none' but data.transform is 'lossless_caps_caseops_v1'; use `pgolf data fetch --variant sp8192-caseops`"):
        build_loader(DataConfig(transform=caseops.TRANSFORM_NAME), resolve_shards(plain, "fineweb_train_*.bin", "training"), 0, 1, cpu)
    sp_plain = load_tokenizer(plain / read_manifest(plain)["tokenizer"]["file"])
    pval = resolve_shards(plain, "fineweb_val_*.bin", "validation")
    assert isinstance(load_byte_counter(sp_plain, 1024, pval, load_validation_tokens(pval, 256), plain), ByteLUT)
