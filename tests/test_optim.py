"""Muon's orthogonalisation dtype: torch's bf16 where the hardware has it, float32 where bf16 is emulated."""

import pytest
import torch

from nanorepro.config import GPTConfig
from nanorepro.gpt import hardware, optim
from nanorepro.gpt.model import GPT


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(48, 144, generator=g)), torch.nn.Parameter(torch.randn(192, 48, generator=g))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original", None])
@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_muon_steps_equal_torchs_bit_for_bit(adjust_lr_fn, nesterov):
    ours, theirs = _params(), _params()
    kw = dict(lr=2e-2, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    _steps(optim.Muon(ours, ns_dtype=torch.bfloat16, **kw), ours)
    _steps(torch.optim.Muon(theirs, **kw), theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_float32_orthogonalisation_agrees_with_bf16_within_its_rounding():
    g = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    args = (5, (3.4445, -4.7750, 2.0315), 1e-7)
    f32 = optim.orthogonalise(g, *args, dtype=torch.float32)
    bf16 = optim.orthogonalise(g, *args, dtype=torch.bfloat16).float()
    assert f32.dtype == torch.float32 and f32.shape == g.shape
    assert (f32 - bf16).norm() / f32.norm() < 0.05
    s = torch.linalg.svdvals(f32)  # Muon's iteration leaves singular values roughly in (0.5, 1.5), not at 0
    assert s.min() > 0.3 and s.max() < 1.5


def test_state_dicts_are_interchangeable_with_torchs_muon():
    ours, theirs = _params(), _params()
    t = torch.optim.Muon(theirs, lr=1e-2)
    _steps(t, theirs, 2)
    o = optim.Muon(ours, ns_dtype=torch.float32, lr=1e-2)
    o.load_state_dict(t.state_dict())
    assert torch.equal(o.state[ours[0]]["momentum_buffer"], t.state[theirs[0]]["momentum_buffer"])


@pytest.mark.parametrize("native, want", [(False, torch.float32), (True, torch.bfloat16)])
def test_muon_orthogonalises_in_bf16_only_where_the_cpu_has_it(monkeypatch, native, want):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    muon, _ = optim.build(model, "muon", 0.1, 1e-3, (0.9, 0.95), "cpu").optimizers
    assert muon.ns_dtype == want


@pytest.mark.parametrize("shape", [(96, 256), (256, 64), (64, 64), (40, 200)])
def test_float32_orthogonalisation_in_gram_space_equals_the_plain_iteration(shape):
    """Wide and tall matrices take the Gram-space route in float32; it must compute the same iteration."""
    gen = torch.Generator().manual_seed(4)
    low_rank = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
    coefficients = (3.4445, -4.7750, 2.0315)
    for g in (torch.randn(shape, generator=gen), low_rank + 1e-3 * torch.randn(shape, generator=gen)):
        x = (g.T if g.size(0) > g.size(1) else g).double()
        x = x / x.norm()
        for _ in range(5):  # the plain iteration in float64, as the reference
            gram = x @ x.T
            x = coefficients[0] * x + (coefficients[1] * gram + coefficients[2] * gram @ gram) @ x
        want = (x.T if g.size(0) > g.size(1) else x).float()
        got = optim.orthogonalise(g, 5, coefficients, 1e-7, dtype=torch.float32)
        assert got.shape == g.shape and got.dtype == torch.float32
        assert (got - want).abs().max() < 1e-4
