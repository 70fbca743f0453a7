"""Role stacks (pgolf/quant/stacks.py): the same matrix of every block coded as one stream when
that is smaller; exact round trips, the header's stack fields checked, version 2 files still read."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch

from pgolf.errors import ArtifactError
from pgolf.quant import container
from pgolf.quant.config import QuantConfig
from pgolf.quant.container import ChunkPlan, decode_artifact, encode_artifact
from pgolf.quant.export import quantize_state_dict
from pgolf.quant.stacks import role_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quant_container import _reseal, _with_header  # noqa: E402


def _blocks(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """n blocks whose same-role matrices share a distribution (so a stack needs one table, not n),
    and one role (``mlp.proj``) whose shape differs between blocks (never stacked)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        state[f"blocks.{i}.attn.c_q.weight"] = torch.randn(48, 64, generator=g) * (1 + 0.2 * torch.rand(1, 64, generator=g))
        state[f"blocks.{i}.mlp.proj.weight"] = torch.randn(64, 64 + 8 * i, generator=g)
    state["tok_emb.weight"] = torch.randn(96, 64, generator=g)
    return state


def _qts(state):
    return quantize_state_dict(state, QuantConfig(embed_format="int6:sd:sym", mlp_format="int6:sd:sym", attn_format="int6:sd:sym", small_numel=64))


def test_role_of() -> None:
    assert role_of("blocks.10.attn.c_q.weight") == "attn.c_q.weight"
    assert role_of("tok_emb.weight") is None and role_of("blocks.x.attn") is None


def test_a_role_stack_is_smaller_and_round_trips_exactly(monkeypatch) -> None:
    qts = _qts(_blocks())
    blob = encode_artifact(qts, {}, ChunkPlan(default_codec="auto", packing="auto"))
    contents = decode_artifact(blob)
    for a, b in zip(qts, contents.qtensors):
        assert torch.equal(a.values, b.values) and torch.equal(a.scale, b.scale), a.name
    info = {t.name: t.streams["v"] for t in contents.tensors}
    # the four c_q are one stream: consecutive rows of a 192-row stack, the stack's bytes shared by rows
    assert [info[f"blocks.{i}.attn.c_q.weight"].stack for i in range(4)] == [(0, 192), (48, 192), (96, 192), (144, 192)]
    assert len({info[f"blocks.{i}.attn.c_q.weight"].nbytes for i in range(4)}) == 1
    # different shapes and non-block tensors keep their own streams
    assert all(info[f"blocks.{i}.mlp.proj.weight"].stack is None for i in range(4)) and info["tok_emb.weight"].stack is None
    # the same artifact without stacks is larger (four tables instead of one)
    monkeypatch.setattr(container, "_stack_roles", lambda qtensors, per_tensor: None)
    unstacked = encode_artifact(qts, {}, ChunkPlan(default_codec="auto", packing="auto"))
    assert len(blob) < len(unstacked)
    assert all(t.streams["v"].stack is None for t in decode_artifact(unstacked).tensors)


def test_stacks_only_with_packing_auto() -> None:
    blob = encode_artifact(_qts(_blocks()), {}, ChunkPlan(default_codec="auto", packing="entropy"))
    assert all(t.streams["v"].stack is None for t in decode_artifact(blob).tensors if "v" in t.streams)


def _c_q_entry(header: dict, i: int) -> list:
    tensor = next(t for t in header["tensors"] if t[0] == f"blocks.{i}.attn.c_q.weight")
    return tensor[4][0]


def test_stack_fields_are_checked() -> None:
    blob = encode_artifact(_qts(_blocks()), {}, ChunkPlan(default_codec="auto", packing="auto"))
    cases = [
        (lambda h: _c_q_entry(h, 3).__setitem__(6, 150), "do not fit its stack"),  # rows 150..198 of 192
        (lambda h: _c_q_entry(h, 1).__setitem__(7, 100), "stream 'v'"),  # a 100-row stack: the payload says otherwise
        (lambda h: _c_q_entry(h, 0).pop(), "expected a list of 6 items"),
        (lambda h: _c_q_entry(h, 0).__setitem__(5, "bitpack"), "expected a list of 6 items"),  # only coded streams stack
    ]
    for edit, message in cases:
        with pytest.raises(ArtifactError, match=message):
            decode_artifact(_with_header(blob, edit))


def test_version_2_files_are_read_and_have_no_stacks() -> None:
    """A version 2 file (written before stacks existed) is a version 3 file without stack fields."""
    qts = _qts(_blocks())
    plain = encode_artifact(qts, {}, ChunkPlan(default_codec="auto", packing="entropy"))
    v2 = _reseal(plain[:8] + struct.pack("<H", 2) + plain[10:-4])
    assert [t.name for t in decode_artifact(v2).qtensors] == [q.name for q in qts]
    # ... and a stack field in a version 2 file is malformed
    stacked = encode_artifact(qts, {}, ChunkPlan(default_codec="auto", packing="auto"))
    with pytest.raises(ArtifactError, match="expected a list of 6 items"):
        decode_artifact(_reseal(stacked[:8] + struct.pack("<H", 2) + stacked[10:-4]))


def test_an_entropy_stream_decoded_as_fewer_rows_is_an_error() -> None:
    """What makes a stack's wrong row count detectable: the order-0 decoder checks that the range
    coder's words are used up, as the context decoder does."""
    import numpy as np

    from pgolf.quant.entropy import decode_entropy, encode_entropy

    u = np.random.default_rng(0).integers(20, 44, (32, 16)).astype(np.uint8)
    data = encode_entropy(u, 6)
    assert np.array_equal(decode_entropy(data, 32, 16, 6), u)
    with pytest.raises(ValueError, match="left over"):
        decode_entropy(data, 16, 16, 6)
