"""lab/kernels.py's hand-written forward and backward against the classroom layer (lora.LoRALinear) and
the plain autograd formulas, in float64: outputs and gradients for every variant, with and without
bias and dropout, both kernel paths (two thin products / one fused matmul), torch.autograd.gradcheck,
the bypass, and what the fast layer leaves to the classroom one."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from lab.kernels import FastLoRALinear, use_fast_kernels
from lora import LoRALinear, inject_lora, lora_layers

VARIANTS = ["lora", "dora", "hira"]


class FixedMask(nn.Module):
    """Dropout with a mask drawn once, so the layers and the reference see the same one."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.view_as(x)


def plain_forward(layer, x, mask=None):
    """The variants as plain autograd formulas on the full weight. x: (..., in); ||V|| is
    detached for DoRA (DoRA section 4.3)."""
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


def make(variant, bias, dropout, tokens=6, seed=0, cls=FastLoRALinear):
    """A float64 6 -> 5 layer, r = 2, and an input of `tokens` tokens, shaped (tokens / 2, 2, 6):
    from 3 tokens on (in * out / (in + out) = 2.7), the fast LoRA and DoRA add B A into W first."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(6, 5, bias=bias).double()
    base.weight.data.copy_(torch.randn(5, 6, generator=g, dtype=torch.float64))
    layer = cls(base, r=2, alpha=3.0, variant=variant)
    if bias:  # a trainable bias (as BitFit trains) checks its gradient too; W stays frozen
        layer.base.bias.requires_grad_(True)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(2, 6, generator=g, dtype=torch.float64))
        layer.lora_B.copy_(torch.randn(5, 2, generator=g, dtype=torch.float64))
        if variant == "dora":
            layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(5, generator=g, dtype=torch.float64))
    x = torch.randn(-(-tokens // 2), min(tokens, 2), 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if dropout:  # inverted dropout with p = 0.5, one mask for the fast and the classroom layer
        mask = (torch.rand(tokens, 6, generator=g, dtype=torch.float64) > 0.5) / 0.5
        layer.lora_dropout = FixedMask(mask)
    return layer, x, mask


def grads(layer, x, y, dy):
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad(y, [x, *params], dy)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])  # two thin products / one matmul with W + s B A
def test_fast_layer_equals_the_classroom_layer_and_the_formula(variant, bias, dropout, tokens):
    fast, x, mask = make(variant, bias, dropout, tokens)
    classroom = LoRALinear(copy.deepcopy(fast.base), r=2, alpha=3.0, variant=variant)
    classroom.load_state_dict(fast.state_dict())
    classroom.lora_dropout = fast.lora_dropout
    dy = torch.randn(*x.shape[:-1], 5, dtype=torch.float64)
    names = ["x", *(n for n, p in fast.named_parameters() if p.requires_grad)]
    y_fast, y_classroom, y_plain = fast(x), classroom(x), plain_forward(fast, x, mask)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_classroom, y_plain, rtol=1e-12, atol=1e-12)
    reference = grads(fast, x, y_plain, dy)
    for layer, y in ((fast, y_fast), (classroom, y_classroom)):
        for name, a, b in zip(names, grads(layer, x, y, dy), reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{type(layer).__name__} {name}")


@pytest.mark.parametrize("cls", [FastLoRALinear, LoRALinear])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])
def test_gradcheck(cls, variant, bias, dropout, tokens):
    """Numerical against analytic Jacobian with respect to x and every trainable parameter. DoRA's
    forward depends on A and B through ||V|| too, which backward treats as a constant by design:
    the norm is held at its value here, so the function checked is the one backward differentiates."""
    layer, x, _ = make(variant, bias, dropout, tokens, cls=cls)
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
    layer.active, layer.coto_on = True, None  # the classroom layer's rules hold: CoTo must step first
    with pytest.raises(RuntimeError, match=r"call coto.step\(step\)"):
        layer(x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_unfrozen_base_weight_is_refused(variant):
    """The fast backward computes no gradient for W: a W that requires grad is an error, not a
    silently untrained weight (the classroom layer's autograd does train it)."""
    layer, x, _ = make(variant, True, False)
    layer.base.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"base.weight requires grad.*requires_grad_\(False\)"):
        layer(x)


class RoundedLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, torch.round(self.weight * 4) / 4, self.bias)


def test_use_fast_kernels_swaps_every_layer_and_keeps_outputs_and_state():
    """In place: the same parameters, state dict and outputs; a Linear subclass with its own
    forward (fake-quantised here) runs the classroom path, which calls that forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), RoundedLinear(8, 3)).double()
    inject_lora(model, ["0", "2"], r=2, alpha=4.0, variant="dora")
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 6, dtype=torch.float64)
    y, state = model(x), copy.deepcopy(model.state_dict())
    assert use_fast_kernels(model) is model
    assert all(type(m) is FastLoRALinear for m in lora_layers(model).values())
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if torch.is_tensor(v))
