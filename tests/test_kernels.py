"""LoRALinear's hand-written forward and backward against the plain autograd formulas, in float64:
torch.autograd.gradcheck (analytic vs numerical Jacobian) and the gradients autograd derives from
the formula written out, for every variant, with and without bias and dropout, and the bypass."""
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from lora import LoRALinear

VARIANTS = ["lora", "dora", "hira"]


class FixedMask(nn.Module):
    """Dropout with a mask drawn once, so the layer and the reference see the same one."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def plain_forward(layer, x, mask=None):
    """The variants as plain autograd formulas: what a reader learns from, and what autograd
    differentiates on its own. x: (..., in); ||V|| is detached for DoRA (DoRA section 4.3)."""
    W, b, A, B, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling
    xd = x if mask is None else x * mask.view_as(x)
    if layer.variant == "lora":
        y = x @ W.T + s * (xd @ A.T) @ B.T
    elif layer.variant == "hira":
        y = x @ W.T + xd @ (s * W * (B @ A)).T
    else:
        norm = (W + s * B @ A).norm(dim=1).clamp_min(1e-12).detach()
        y = layer.lora_magnitude / norm * (x @ W.T + s * (xd @ A.T) @ B.T)
    return y if b is None else y + b


def make(variant, bias, dropout, tokens=6, seed=0):
    """A float64 6 -> 5 layer, r = 2, and an input of `tokens` tokens, shaped (tokens / 2, 2, 6):
    from 3 tokens on (in * out / (in + out) = 2.7), LoRA and DoRA add B A into W first."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(6, 5, bias=bias).double(), r=2, alpha=3.0, variant=variant)
    if bias:  # a trainable bias (as BitFit trains) checks its gradient too; W stays frozen
        layer.base.bias.requires_grad_(True)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 2, generator=g, dtype=torch.float64))
        if variant == "dora":
            layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(5, generator=g, dtype=torch.float64))
    x = torch.randn(-(-tokens // 2), min(tokens, 2), 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if dropout:  # inverted dropout with p = 0.5, on the flattened (T, in) input the layer sees
        mask = (torch.rand(tokens, 6, generator=g, dtype=torch.float64) > 0.5) / 0.5
        layer.lora_dropout = FixedMask(mask)
    return layer, x, mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])  # two thin products / one matmul with W + s B A
def test_backward_matches_autograd_of_the_formula(variant, bias, dropout, tokens):
    layer, x, mask = make(variant, bias, dropout, tokens)
    params = [p for p in layer.parameters() if p.requires_grad]
    dy = torch.randn(*x.shape[:-1], 5, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, plain_forward(layer, x, mask), rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(y, [x, *params], dy)
    reference = torch.autograd.grad(plain_forward(layer, x, mask), [x, *params], dy)
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])
def test_gradcheck(variant, bias, dropout, tokens):
    """Numerical against analytic Jacobian with respect to x and every trainable parameter. DoRA's
    forward depends on A and B through ||V|| too, which backward treats as a constant by design:
    the norm is held at its value here, so the function checked is the one backward differentiates."""
    layer, x, _ = make(variant, bias, dropout, tokens)
    if variant == "dora":
        norm = layer._dora_norm(layer.base.weight)
        layer._dora_norm = lambda W: norm
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bypass_is_the_frozen_layer(variant):
    layer, x, _ = make(variant, True, True)
    layer.active = False
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).sum().backward()
    assert all(p.grad is None for n, p in layer.named_parameters() if n.startswith("lora_"))
    torch.testing.assert_close(x.grad, layer.base.weight.sum(0).expand_as(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_unfrozen_base_weight_is_refused(variant):
    layer, x, _ = make(variant, True, False)
    layer.base.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"base.weight requires grad.*requires_grad_\(False\)"):
        layer(x)
