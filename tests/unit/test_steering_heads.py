"""The steering-heads artifact and the batched Eq 3.1 evaluation, against hand-written sums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiller.server.errors import InvalidArgument
from tiller.server.formats.heads import (
    HEADS_MANIFEST,
    HeadsError,
    HeadsManifest,
    HeadSpec,
    attach_heads,
    is_identity,
    load_tensors,
    read_heads,
    resolve_weights,
    save_heads,
)

H, V = 6, 10
SPECS = (
    HeadSpec("base", "base", 0, 1.0),
    HeadSpec("help", "lowrank", 2, 0.0),
    HeadSpec("tone", "full", 0, 0.0),
    HeadSpec("short", "lowrank", 3, 0.0),
)


def _artifact(tmp_path: Path) -> tuple[Path, HeadsManifest, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    t = {
        "help.A": torch.randn(2, H, generator=g),
        "help.B": torch.randn(V, 2, generator=g),
        "tone.W": torch.randn(V, H, generator=g),
        "short.A": torch.randn(3, H, generator=g),
        "short.B": torch.randn(V, 3, generator=g),
    }
    m = HeadsManifest("m", H, V, SPECS)
    return save_heads(tmp_path / "h", m, t), m, t


def test_round_trip_and_header_checks(tmp_path: Path) -> None:
    d, m, t = _artifact(tmp_path)
    assert read_heads(d) == m
    assert all(torch.equal(load_tensors(d)[k], v) for k, v in t.items())
    data = json.loads((d / HEADS_MANIFEST).read_text())
    data["attributes"][1]["rank"] = 4
    (d / HEADS_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(HeadsError, match=r"help.A: expected \(4, 6\), found \(2, 6\)"):
        read_heads(d)


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        ((HeadSpec("a", "base"), HeadSpec("a", "base")), "duplicate"),
        ((HeadSpec("a", "mlp"),), "kind 'mlp' is not one of: base, lowrank, full"),  # type: ignore[arg-type]
        ((HeadSpec("a", "lowrank", 0),), "rank >= 1"),
        ((HeadSpec("a.b", "base"),), "without '.'"),
        ((HeadSpec("a", "base", 0, float("nan")),), "finite"),
    ],
)
def test_bad_manifests(specs: tuple[HeadSpec, ...], needle: str) -> None:
    with pytest.raises(HeadsError, match=needle):
        HeadsManifest("m", H, V, specs)


def test_weights_resolution() -> None:
    m = HeadsManifest("m", H, V, SPECS)
    assert resolve_weights(m, ()) == (1.0, 0.0, 0.0, 0.0)
    assert resolve_weights(m, (("tone", -0.5), ("base", 1.5))) == (1.5, 0.0, -0.5, 0.0)
    with pytest.raises(InvalidArgument, match="valid: base, help, tone, short"):
        resolve_weights(m, (("humor", 1.0),))
    assert is_identity(m, (1.0, 0.0, 0.0, 0.0))
    assert not is_identity(m, (1.0, 0.0, 0.0, 0.1))
    assert not is_identity(m, (0.0, 1.0, 0.0, 0.0))  # a low-rank head is not the base model


def test_attach_checks_attributes_and_model_dims(tmp_path: Path) -> None:
    d, m, _ = _artifact(tmp_path)
    assert attach_heads(d, (), (H, V)) == m
    assert attach_heads(d, m.names, (H, V)) == m
    with pytest.raises(HeadsError, match="differ from the heads'"):
        attach_heads(d, ("base", "help"), (H, V))
    with pytest.raises(HeadsError, match="no steering support"):
        attach_heads(d, (), None)
    with pytest.raises(HeadsError, match="the served model has 8, 10"):
        attach_heads(d, (), (8, V))
    assert attach_heads(tmp_path, (), (H, V)) is None


def test_batched_mix_equals_eq_3_1_written_out(tmp_path: Path) -> None:
    from tiller.server.steering.processor import LoadedHeads

    d, _, t = _artifact(tmp_path)
    heads = LoadedHeads.load(d, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(V, H, generator=g)
    h = torch.randn(3, H, generator=g)
    lam = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.9, -0.4, 0.0], [-1.0, 0.0, 2.0, 1.5]])
    x = h @ w0.T
    x[2, 4] = float("-inf")  # forbidden by an earlier processor: stays forbidden
    got = heads.mix(x.clone(), h, lam)
    w = [w0, w0 + t["help.B"] @ t["help.A"], t["tone.W"], w0 + t["short.B"] @ t["short.A"]]
    for i in range(3):
        want = sum(lam[i, j] * (h[i] @ w[j].T) for j in range(4))
        assert isinstance(want, torch.Tensor)
        if i == 2:
            want[4] = float("-inf")
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], x[0])  # the base one-hot is the base row, bit for bit


def test_difference_of_two_heads(tmp_path: Path, tiny_model: Path) -> None:
    from tiller.server.tools.heads_build import base_head, difference_head, init_heads

    a = tmp_path / "a"
    init_heads(tiny_model, a, ["x", "y"], rank=3, scale=0.5, seed=1)
    m = difference_head(tiny_model, (a, "x"), (a, "y"), tmp_path / "d", "x_minus_y")
    assert [h.rank for h in m.heads] == [0, 6]
    ta, td = load_tensors(a), load_tensors(tmp_path / "d")
    want = ta["x.B"] @ ta["x.A"] - ta["y.B"] @ ta["y.A"]
    torch.testing.assert_close(td["x_minus_y.B"] @ td["x_minus_y.A"], want)
    full = difference_head(tiny_model, (a, "x"), (a, "base"), tmp_path / "f", "dx")
    assert full.heads[1].kind == "lowrank"
    w0 = base_head(tiny_model)
    assert w0.shape == (read_heads(a).vocab_size, read_heads(a).hidden_size)


def test_low_rank_fast_path_keeps_forbidden_tokens(tmp_path: Path) -> None:
    """Without full heads and with a positive W_0 coefficient the mix takes its fast path."""
    from tiller.server.steering.processor import LoadedHeads

    g = torch.Generator().manual_seed(2)
    specs = (SPECS[0], SPECS[1])
    t = {"help.A": torch.randn(2, H, generator=g), "help.B": torch.randn(V, 2, generator=g)}
    heads = LoadedHeads.load(
        save_heads(tmp_path / "lr", HeadsManifest("m", H, V, specs), t), torch.device("cpu")
    )
    w0, h = torch.randn(V, H, generator=g), torch.randn(2, H, generator=g)
    x = h @ w0.T
    x[1, 3] = float("-inf")
    lam = torch.tensor([[1.0, 0.0], [-0.5, 1.5]])
    got = heads.mix(x.clone(), h, lam)
    assert torch.equal(got[0], x[0])
    want = -0.5 * (h[1] @ w0.T) + 1.5 * (h[1] @ (w0 + t["help.B"] @ t["help.A"]).T)
    want[3] = float("-inf")
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)
