"""LoRALinear and the model helpers against explicit float64 formulas."""
import copy

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, inject_lora, load_lora_state_dict, lora_layers, lora_state_dict,
                  lora_metadata, mark_only_lora_as_trainable, merge_and_unload, merge_lora, unload,
                  unmerge_lora)

VARIANTS = ["lora", "dora", "hira"]


def make_layer(variant, bias=True, rslora=False, seed=0, dropout=0.0):
    """A float64 layer on the CPU with a visible update, and an input (4, 2, 7)."""
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
def test_forward_matches_formula(variant, bias, device):
    layer, x = make_layer(variant, bias)
    y = copy.deepcopy(layer).to(device)(x.to(device)).cpu()
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-12, atol=1e-12)
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
def test_starts_at_base(variant, device):
    base = nn.Linear(16, 8).double().to(device)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8.0, variant=variant)
    x = torch.randn(3, 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-13, atol=1e-13)
    assert (layer.in_features, layer.out_features) == (16, 8)  # read as an nn.Linear's
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
def test_merge_unmerge_unload_agree(variant, device):
    model, base_model = two_block_model(variant)
    model, base_model = model.to(device), base_model.to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
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
    plain = merge_and_unload(model)
    assert not lora_layers(plain)
    assert list(plain.state_dict()) == list(base_model.state_dict())
    torch.testing.assert_close(plain(x), y, rtol=1e-12, atol=1e-12)


def test_inactive_adapter_is_bypassed_and_frozen(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    inject_lora(model, ["0", "2"], r=2, alpha=4.0, dropout=0.1)
    mark_only_lora_as_trainable(model, also=["4"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    low, high = model[0], model[2]
    low.active = False
    x = torch.randn(4, 6, device=device)
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
    with pytest.raises(ValueError, match=r"must be an integer in 1..5 \(min of in=7, out=5\)"):
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
    with pytest.raises(AttributeError, match="has no attribute `head`"):  # torch's message names it
        mark_only_lora_as_trainable(model, also=["head"])
    assert all(p.requires_grad for n, p in model.named_parameters() if "base" not in n)  # nothing frozen yet


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
    with pytest.raises(ValueError, match=r"2 unexpected \['0.lora_magnitude'"):
        load_lora_state_dict(plain_lora, state)


def float32_model(variant):
    model, base_model = two_block_model(variant)
    model, base_model = model.float(), base_model.float()
    with torch.no_grad():  # a magnitude that is not the base's row norms, so DoRA's merge is visible
        for layer in lora_layers(model).values():
            if variant == "dora":
                layer.lora_magnitude.mul_(1.5)
    return model, base_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_move_unmerge_keeps_no_tensor_outside_parameters_and_buffers(variant, device):
    """merge(); model.to(device); unmerge() gives back the unmerged model: unmerge() recomputes W
    from what moves with the model (parameters, buffers), and merged layers hold no (out, in) copy."""
    model, _ = float32_model(variant)
    x = torch.randn(5, 6)
    y = model(x)
    W0 = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    merge_lora(model)
    for layer in lora_layers(model).values():
        assert [k for k, v in vars(layer).items() if torch.is_tensor(v)] == []
    model.to(device)
    unmerge_lora(model)
    torch.testing.assert_close(model(x.to(device)).cpu(), y, rtol=1e-5, atol=1e-5)
    for n, l in lora_layers(model).items():
        torch.testing.assert_close(l.base.weight.cpu(), W0[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_in_float32_unmerge_in_float64(variant):
    model, _ = float32_model(variant)
    x = torch.randn(5, 6, dtype=torch.float64)
    reference_model = copy.deepcopy(model).double()  # unmerged, in float64 throughout
    merge_lora(model)
    model.double()
    unmerge_lora(model)
    torch.testing.assert_close(model(x), reference_model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_state_dict_loads_merged(variant, device):
    """A merged model's state_dict() carries the merged flag: loaded into a freshly injected model,
    the update is counted once, and unmerging there gives back the base weights."""
    model, base_model = two_block_model(variant)
    model, base_model = model.to(device), base_model.to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    y = model(x)
    merge_lora(model)
    fresh = copy.deepcopy(base_model)
    inject_lora(fresh, ["0", "2"], r=2, alpha=4.0, variant=variant)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()  # a merged layer is not trained through
    assert all(l.merged for l in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), y, rtol=1e-12, atol=1e-12)
    unmerge_lora(fresh)
    torch.testing.assert_close(fresh(x), y, rtol=1e-12, atol=1e-12)
    for name, layer in lora_layers(fresh).items():
        torch.testing.assert_close(layer.base.weight, base_model.get_submodule(name).weight,
                                   rtol=1e-12, atol=1e-12)
    unmerged_state = copy.deepcopy(fresh.state_dict())
    merge_lora(fresh)
    fresh.load_state_dict(unmerged_state)  # and an unmerged state loads unmerged
    assert not any(l.merged for l in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_layer_cannot_be_bypassed_or_trained(variant):
    model, _ = two_block_model(variant)
    x = torch.randn(5, 6, dtype=torch.float64)
    merge_lora(model)
    layer = model[0]
    model.train()
    with pytest.raises(RuntimeError, match=r"merged LoRA layer cannot be trained: call unmerge\(\)"):
        model(x)
    with torch.no_grad():
        y = model(x)  # no gradient: nothing is trained through it
    model.eval()
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    layer.active = False
    with pytest.raises(RuntimeError, match=r"merged LoRA layer cannot be bypassed: call unmerge"):
        model(x)
    layer.active = True
    unmerge_lora(model)
    layer.active = False
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unload_gives_the_base_model_and_merge_and_unload_the_adapted_one(variant):
    model, base_model = two_block_model(variant)
    x = torch.randn(5, 6, dtype=torch.float64)
    y = model(x)
    merged = merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(merged(x), y, rtol=1e-12, atol=1e-12)
    for keep_merged in (False, True):
        plain = copy.deepcopy(model)
        if keep_merged:
            merge_lora(plain)
        plain = unload(plain)
        assert not lora_layers(plain) and list(plain.state_dict()) == list(base_model.state_dict())
        torch.testing.assert_close(plain(x), base_model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"already has LoRA layers: unload\(model\)"):
        inject_lora(model, ["4"], r=1, alpha=1.0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=0.0), ValueError, "alpha=0.0 must be a finite number > 0"),
    (dict(alpha=-2.0), ValueError, "alpha=-2.0 must be"),
    (dict(alpha=float("nan")), ValueError, "alpha=nan must be"),
    (dict(alpha=float("inf")), ValueError, "alpha=inf must be"),
    (dict(alpha="16"), ValueError, "alpha='16' must be a finite number"),
    (dict(r=True), ValueError, r"rank r=True must be an integer in 1.."),
    (dict(r=2.0), ValueError, "rank r=2.0 must be an integer"),
    (dict(rslora="no"), ValueError, "rslora='no' must be True or False"),  # "no" is truthy: silently on
    (dict(dropout="0.1"), ValueError, "dropout='0.1' must be a number"),
    (dict(dropout=1.0), ValueError, r"dropout=1.0 must be a number in \[0, 1\)"),  # nn.Dropout takes 1: all zero
    (dict(dropout=float("nan")), ValueError, r"dropout=nan must be a number in \[0, 1\)"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(r=2, alpha=4.0) | kwargs
    with pytest.raises(error, match=match):
        LoRALinear(nn.Linear(7, 5), **args)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(error, match=match):
        inject_lora(model, ["0"], **args)
    assert not lora_layers(model)


def test_injection_is_all_or_nothing_and_every_target_must_match():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"targets \['nomatch'\] match no nn.Linear; the linear layers are: 0, 2"):
        inject_lora(model, ["0", "nomatch"], r=2, alpha=4.0)
    with pytest.raises(ValueError, match=r"rank r=4 must be an integer in 1..3"):
        inject_lora(model, ["0", "2"], r=4, alpha=4.0)  # fits layer 0, not layer 2 (out=3)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_metadata_tells_variants_apart():
    hira, _ = two_block_model("hira")
    lora_model, _ = two_block_model("lora")
    assert lora_metadata(hira) == {"variant": "hira", "r": "2", "alpha": "4.0", "scaling": "2.0"}
    with pytest.raises(ValueError, match="saved as variant=hira, this model has variant=lora"):
        load_lora_state_dict(lora_model, lora_state_dict(hira), metadata=lora_metadata(hira))
    other, _ = two_block_model("hira")
    with pytest.warns(UserWarning, match="no metadata: variant, alpha and rslora unchecked"):
        load_lora_state_dict(other, lora_state_dict(lora_model))  # loads: only the metadata could tell
    load_lora_state_dict(other, lora_state_dict(hira), metadata={**lora_metadata(hira), "format": "pt"})
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(other(x), hira(x), rtol=0, atol=0)


def test_dora_zero_row_gives_no_nan():
    """A zero row of W with a zero row of B: V's row is zero, m's entry is 0 (the row norm of W).
    Like F.normalize, the norm is clamped to 1e-12, so the row stays zero instead of 0 / 0."""
    layer, x = make_layer("dora")
    with torch.no_grad():
        layer.base.weight[2] = 0
        layer.lora_B[2] = 0
        layer.lora_magnitude[2] = 0
    V = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    W_eff = layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
    expected = x @ W_eff.T + layer.base.bias
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    W0 = layer.base.weight.clone()
    layer.merge()
    assert torch.isfinite(layer.base.weight).all()
    torch.testing.assert_close(layer.base.weight, W_eff, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_step_keeps_float32_master_weights(variant, device):
    """One training step under bf16 autocast (how train_vit.py trains on CUDA; on the CPU through
    CPU autocast): parameters and gradients stay float32, and each parameter's update matches the
    float32 step's to 3 % of its norm (bf16 keeps 8 bits of mantissa: ~0.4 % per rounding)."""
    model, _ = float32_model(variant)
    model = model.to(device)
    mark_only_lora_as_trainable(model)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2)).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after = {}
    for amp in (False, True):
        trained = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = trained(x).square().mean()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in opt.param_groups[0]["params"])
        opt.step()
        assert all(p.dtype == torch.float32 for p in trained.parameters())
        after[amp] = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    for name, p in after[True].items():
        step = after[False][name] - before[name]
        assert (p - after[False][name]).norm() <= 0.03 * step.norm(), name


@pytest.mark.parametrize("variant", ["hira", "dora"])
def test_merge_refuses_what_unmerge_could_not_undo(variant):
    """HiRA's merge multiplies W by 1 + s B A elementwise: a factor near 0 could not be divided
    back. DoRA's merge scales row i by m_i / ||V_i||: m_i = 0 with V_i != 0 erases the row. merge()
    refuses both and changes nothing; merge_and_unload, one way, folds them."""
    layer, x = make_layer(variant)
    with torch.no_grad():
        if variant == "hira":  # s (B A)[0, 0] = -1: factor 0 at entry (0, 0)
            layer.lora_B[0] *= -1 / (layer.scaling * (layer.lora_B[0] @ layer.lora_A[:, 0]))
        else:
            layer.lora_magnitude[1] = 0
    y, W0 = reference(layer, x), layer.base.weight.clone()
    why = r"1 \+ scaling \* B A is near 0 at some entry" if variant == "hira" else "magnitude 0"
    match = f"cannot merge this (HiRA|DoRA) layer reversibly.*{why}.*merge_and_unload"
    with pytest.raises(ValueError, match=match):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, W0)
    plain = merge_and_unload(nn.Sequential(layer))[0]
    torch.testing.assert_close(plain(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_coto_on_bypasses_in_training_mode_only(variant):
    """CoTo's draw (`coto_on`) acts in training mode only; the user's `active` in every mode."""
    layer, x = make_layer(variant)
    layer.coto_on = False
    layer.train()
    y = layer(x.requires_grad_(True))
    torch.testing.assert_close(y, layer.base(x), rtol=0, atol=0)  # exactly the frozen layer
    y.sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    layer.eval()  # evaluation sees the whole adapter, whatever CoTo drew last
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)
    layer.coto_on, layer.active = True, False
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


def test_coto_on_none_raises_in_a_training_forward_only():
    layer, x = make_layer("lora")
    layer.coto_on = None  # a CoTo is attached and has not stepped yet
    with pytest.raises(RuntimeError, match=r"call coto.step\(step\) before each optimizer step"):
        layer.train()(x)
    torch.testing.assert_close(layer.eval()(x), reference(layer, x), rtol=1e-12, atol=1e-12)


def test_new_layers_follow_the_mode_of_the_model():
    """inject_lora into a model in eval mode: the adapters' dropout is off, two forwards agree."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    inject_lora(model, ["0", "2"], r=2, alpha=4.0, dropout=0.5)
    assert not any(m.training for m in model.modules())
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    assert LoRALinear(nn.Linear(4, 4), r=1, alpha=1.0).training  # a training base: a training layer


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)


@pytest.mark.parametrize("model, target", [
    (Attention(), "out_proj"),  # MHA reads out_proj.weight itself: the adapter would never run
    (nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), "linear1"),  # eval fast path reads the weights
    (nn.TransformerDecoderLayer(8, 2, dim_feedforward=16), "linear2"),
    (nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)), "self_attn.out_proj"),
])
def test_layers_whose_weights_torch_reads_directly_are_refused(model, target):
    with pytest.raises(ValueError, match=r"cannot adapt \S*" + target + r": nn.MultiheadAttention .* skipping"):
        inject_lora(model, [target], r=2, alpha=4.0)
    assert not lora_layers(model)


class RoundedLinear(nn.Linear):
    """A fake-quantised layer: its own forward rounds W to quarters."""

    def forward(self, x):
        return nn.functional.linear(x, torch.round(self.weight * 4) / 4, self.bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_linear_subclass_keeps_its_forward_unmerged_and_merged(variant):
    torch.manual_seed(0)
    base = RoundedLinear(7, 5).double()
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=6.0, variant=variant)
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the subclass
    with torch.no_grad():
        layer.lora_B.normal_()
    W_eff = layer.base.weight + layer.delta_weight()
    if variant == "lora":  # unmerged: the subclass's output plus the low-rank term
        torch.testing.assert_close(layer(x), base(x) + x @ (W_eff - base.weight).T, rtol=1e-12, atol=1e-12)
    layer.merge()
    expected = nn.functional.linear(x, torch.round(W_eff * 4) / 4, base.bias)  # the subclass on the merged W
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wrap", [
    lambda m: nn.utils.parametrizations.weight_norm(m),
    lambda m: nn.utils.parametrizations.spectral_norm(m),
    lambda m: torch.nn.utils.weight_norm(m),  # the old form: a forward pre-hook
])
def test_parametrized_linears_are_refused(wrap):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = nn.Sequential(wrap(nn.Linear(6, 4)))
    with pytest.raises(ValueError, match=r"parametrized .* merge\(\) could not fold .* remove the parametrization"):
        LoRALinear(model[0], r=2, alpha=4.0)
    with pytest.raises(ValueError, match="parametrized"):
        inject_lora(model, ["0"], r=2, alpha=4.0)
    assert not lora_layers(model)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 6)
        self.lm_head = nn.Linear(6, 10, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2 does


def test_a_tied_weight_is_refused_naming_both_and_the_fix():
    model = TiedLM()
    with pytest.raises(ValueError, match=r"cannot adapt lm_head: wte.weight and lm_head.weight are one tensor.*untie"):
        inject_lora(model, ["lm_head"], r=2, alpha=4.0)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    assert inject_lora(model, ["lm_head"], r=2, alpha=4.0) == ["lm_head"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_merge_unmerge_cycles_do_not_drift(variant):
    """The merge arithmetic runs in float32: W is rounded to bf16 once per merge and once per
    unmerge, and 100 cycles end no further from the original W than one cycle does (within 25 %),
    and within one bf16 rounding (2^-8) of its norm."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48).bfloat16(), r=8, alpha=16.0, variant=variant)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
        if variant == "dora":
            layer.lora_magnitude.mul_(1.3)
    W0 = layer.base.weight.detach().float().clone()
    drift = {}
    for cycle in range(1, 101):
        layer.merge()
        layer.unmerge()
        drift[cycle] = ((layer.base.weight.float() - W0).norm() / W0.norm()).item()
    assert drift[100] <= 1.25 * drift[1] and drift[100] <= 2 ** -8, drift


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_optimizer_step_while_merged_is_refused_at_unmerge(variant):
    model, _ = two_block_model(variant)
    opt = torch.optim.SGD([p for layer in lora_layers(model).values() for p in layer.parameters(recurse=False)], lr=0.1)
    model(torch.randn(5, 6, dtype=torch.float64)).square().sum().backward()
    merge_lora(model)
    merged = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    opt.step()  # the adapter moves while W holds the old one
    with pytest.raises(RuntimeError, match=r"adapter changed while merged \(an optimizer step\?\)"):
        unmerge_lora(model)
    assert all(torch.equal(l.base.weight, merged[n]) and l.merged for n, l in lora_layers(model).items())


def test_inject_after_ddp_is_refused(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4)))
        with pytest.raises(ValueError, match="inject_lora before wrapping the model in DistributedDataParallel"):
            inject_lora(ddp, ["0"], r=2, alpha=4.0)
        assert not lora_layers(ddp)
    finally:
        dist.destroy_process_group()


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Linear(6, 4))
    inject_lora(model, ["0"], r=np.int64(2), alpha=4.0)
    assert model[0].r == 2 and type(model[0].r) is int and lora_metadata(model)["r"] == "2"
