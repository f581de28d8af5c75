"""LoRALinear and the model helpers against explicit float64 formulas."""
import copy

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, inject_lora, load_lora_state_dict, lora_layers, lora_state_dict,
                  mark_only_lora_as_trainable, merge_lora, unload_lora, unmerge_lora)

VARIANTS = ["lora", "dora", "hira"]


def make_layer(variant, bias=True, rslora=False, seed=0, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(7, 5, bias=bias).double()
    layer = LoRALinear(base, r=3, alpha=6.0, variant=variant, rslora=rslora, dropout=dropout)
    with torch.no_grad():  # a non-zero B (and magnitude), so the update is visible
        layer.lora_B.copy_(torch.randn(5, 3, generator=g, dtype=torch.float64))
        if variant == "dora":
            layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(5, generator=g, dtype=torch.float64))
    return layer, torch.randn(4, 2, 7, generator=g, dtype=torch.float64)


def reference(layer, x, detach_norm=True):
    """The variants' formulas, written out on the full (out, in) weight."""
    W, b = layer.base.weight, layer.base.bias
    BA = layer.lora_B @ layer.lora_A
    if layer.variant == "lora":
        W_eff = W + layer.scaling * BA
    elif layer.variant == "hira":
        W_eff = W + layer.scaling * W * BA
    else:
        V = W + layer.scaling * BA
        norm = V.norm(dim=1, keepdim=True)
        W_eff = layer.lora_magnitude[:, None] * V / (norm.detach() if detach_norm else norm)
    y = x @ W_eff.T
    return y if b is None else y + b


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(variant, bias):
    layer, x = make_layer(variant, bias)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    # delta_weight() is W_eff - W: read W_eff off the identity input, bias removed
    W_eff = (reference(layer, torch.eye(7, dtype=torch.float64)) - (layer.base.bias if bias else 0)).T
    torch.testing.assert_close(layer.delta_weight(), W_eff - layer.base.weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_only_touches_the_adapter_input(variant):
    layer, x = make_layer(variant, dropout=0.5)
    layer.eval()  # dropout off: the formula exactly
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    xd = layer.lora_dropout(x)  # the same dropout mask
    W, s = layer.base.weight, layer.scaling
    update = s * layer.lora_B @ layer.lora_A
    if variant == "lora":
        expected = layer.base(x) + xd @ update.T
    elif variant == "hira":
        expected = layer.base(x) + xd @ (W * (layer.lora_B @ layer.lora_A) * s).T
    else:
        scale = layer.lora_magnitude / (W + update).norm(dim=1)
        expected = scale * (x @ W.T + xd @ update.T) + layer.base.bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, reference(layer, x))


def test_scaling_and_rslora():
    layer, x = make_layer("lora", rslora=True)
    assert layer.scaling == pytest.approx(6.0 / 3 ** 0.5)
    W_eff = layer.base.weight + 6.0 / 3 ** 0.5 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ W_eff.T + layer.base.bias, rtol=1e-12, atol=1e-12)
    assert make_layer("lora")[0].scaling == 2.0


def test_dora_norm_is_constant_in_backward():
    """DoRA section 4.3: gradients treat ||V|| as a constant; they differ from the full gradient."""
    layer, x = make_layer("dora")
    layer(x).square().sum().backward()
    ours = layer.lora_B.grad.clone()
    layer.zero_grad()
    reference(layer, x, detach_norm=True).square().sum().backward()
    torch.testing.assert_close(ours, layer.lora_B.grad, rtol=1e-10, atol=1e-10)
    layer.zero_grad()
    reference(layer, x, detach_norm=False).square().sum().backward()
    assert not torch.allclose(ours, layer.lora_B.grad, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_starts_at_base(variant):
    base = nn.Linear(16, 8).double()
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8.0, variant=variant)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-13, atol=1e-13)
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A is random, B is zero
    bound = 1 / 16 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A.abs().max() <= bound


def two_block_model(variant="lora"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference_model = copy.deepcopy(model)
    names = inject_lora(model, ["0", "2"], r=2, alpha=4.0, variant=variant)
    assert names == ["0", "2"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    return model, reference_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_unload_agree(variant):
    model, base_model = two_block_model(variant)
    x = torch.randn(5, 6, dtype=torch.float64)
    W0 = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    y = model(x)
    assert not torch.allclose(y, base_model(x))
    model.train()  # merging does not depend on the mode
    merge_lora(model)
    assert all(l.merged for l in lora_layers(model).values())
    merged_weights = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    merge_lora(model)  # idempotent
    for n, l in lora_layers(model).items():
        assert torch.equal(l.base.weight, merged_weights[n])
        torch.testing.assert_close(l.base.weight, W0[n] + l.delta_weight(), rtol=1e-13, atol=1e-13)
    model.eval()
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    unmerge_lora(model)
    unmerge_lora(model)  # idempotent
    for n, l in lora_layers(model).items():
        torch.testing.assert_close(l.base.weight, W0[n], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    plain = unload_lora(model)
    assert not lora_layers(plain)
    assert list(plain.state_dict()) == list(base_model.state_dict())
    torch.testing.assert_close(plain(x), y, rtol=1e-12, atol=1e-12)


def test_inactive_adapter_is_bypassed_and_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    inject_lora(model, ["0", "2"], r=2, alpha=4.0, dropout=0.1)
    mark_only_lora_as_trainable(model, also=["4"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    low, high = model[0], model[2]
    low.active = False
    x = torch.randn(4, 6)
    assert torch.equal(low(x), low.base(x))  # exactly the base output, dropout not applied
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    model(x).square().mean().backward()
    assert low.lora_A.grad is None and low.lora_B.grad is None
    assert high.lora_A.grad is not None
    opt.step()
    after = model.state_dict()
    for key in ("0.lora_A", "0.lora_B", "0.base.weight", "2.base.weight", "2.base.bias"):
        assert torch.equal(after[key], before[key]), key
    for key in ("2.lora_A", "2.lora_B", "4.weight"):
        assert not torch.equal(after[key], before[key]), key


def test_errors_are_clear():
    with pytest.raises(ValueError, match="must be an integer in 1..5"):
        LoRALinear(nn.Linear(7, 5), r=6, alpha=1.0)
    with pytest.raises(ValueError, match="rank r=0"):
        LoRALinear(nn.Linear(7, 5), r=0, alpha=1.0)
    with pytest.raises(ValueError, match="unknown variant 'lokr'"):
        LoRALinear(nn.Linear(7, 5), r=1, alpha=1.0, variant="lokr")
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(7, 5), r=1, alpha=1.0, dropout=1.0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"match no nn.Linear; the linear layers are: 0, 2"):
        inject_lora(model, ["qkv"], r=1, alpha=1.0)
    inject_lora(model, ["0"], r=1, alpha=1.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, ["2"], r=1, alpha=1.0)
    with pytest.raises(ValueError, match="'head', which is not a module"):
        mark_only_lora_as_trainable(model, also=["head"])


def test_trainable_count_line(capsys):
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    inject_lora(model, ["0"], r=2, alpha=2.0, variant="dora")
    line = mark_only_lora_as_trainable(model, also=["2"])
    trainable = 2 * 10 + 6 * 2 + 6 + (6 * 3 + 3)  # A, B, magnitude, head
    total = trainable + 10 * 6 + 6 - (6 * 3 + 3) + (6 * 3 + 3)
    assert line == (f"trainable params: {trainable:,} || all params: {total:,} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert line in capsys.readouterr().out


def test_state_dict_round_trip_and_mismatch():
    model, _ = two_block_model("dora")
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"{n}.{p}" for n in ("0", "2")
                                   for p in ("lora_A", "lora_B", "lora_magnitude"))
    other, _ = two_block_model("dora")
    with torch.no_grad():
        for layer in lora_layers(other).values():
            layer.lora_B.zero_()
    load_lora_state_dict(other, state)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)

    wide = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    inject_lora(wide, ["0", "2"], r=2, alpha=4.0, variant="dora")
    with pytest.raises(ValueError, match=r"0.lora_B has shape \(8, 2\) in the state but \(9, 2\)"):
        load_lora_state_dict(wide, state)
    plain_lora, _ = two_block_model("lora")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_lora_state_dict(plain_lora, state)
