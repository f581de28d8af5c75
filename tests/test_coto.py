"""CoTo's schedule and controller against explicit formulas and counts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from coto import CoTo, active_mask, block_groups, block_of, coto_prob, set_active
from lora import inject_lora, lora_layers


def test_linear_schedule_formula_and_endpoints():
    T, ratio = 10, 0.75
    ramp = math.ceil(ratio * T)  # 8
    for p0 in (0.0, 0.1, 0.5):
        probs = [coto_prob(t, T, p0, ratio) for t in range(T + 3)]
        assert probs[0] == p0
        assert probs[ramp - 1] < 1.0 and probs[ramp] == 1.0 and all(p == 1.0 for p in probs[ramp:])
        for t in range(ramp):
            assert probs[t] == pytest.approx(min(p0 + (1 - p0) * t / ramp, 1.0), abs=1e-15)


@pytest.mark.parametrize("shape", ["linear", "exp", "sine"])
@pytest.mark.parametrize("T,ratio", [(7, 0.75), (100, 0.5), (33, 1.0)])
def test_every_shape_is_monotone_and_reaches_one_at_ceil(shape, T, ratio):
    p0 = 0.1
    probs = [coto_prob(t, T, p0, ratio, shape) for t in range(T + 1)]
    ramp = math.ceil(ratio * T)
    assert probs[0] == pytest.approx(p0)
    assert all(a <= b for a, b in zip(probs, probs[1:]))
    assert probs[ramp - 1] < 1.0 and probs[ramp] == 1.0


def test_shapes_differ_as_documented():
    mid = [coto_prob(50, 100, 0.0, 1.0, s) for s in ("exp", "linear", "sine")]
    assert mid[0] < mid[1] == 0.5 < mid[2]
    assert mid[2] == pytest.approx(math.sin(math.pi / 4))
    assert mid[0] == pytest.approx(math.expm1(2.5) / math.expm1(5.0))


def test_constant_shape_is_layer_drop_at_rate_one_minus_p0():
    assert [coto_prob(t, 10, 0.8, 1.0, "constant") for t in (0, 5, 9, 10)] == [0.8, 0.8, 0.8, 1.0]


def test_stage1_ratio_zero_is_plain_lora():
    assert [coto_prob(t, 10, 0.0, 0.0) for t in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(p0=1.5), "p0=1.5 is a probability"), (dict(p0=-0.1), "p0=-0.1"),
    (dict(stage1_ratio=1.2), "stage1_ratio=1.2"), (dict(total_steps=0), "total_steps=0"),
    (dict(shape="cosine"), "unknown shape 'cosine'"), (dict(step=-1), "step=-1"),
])
def test_schedule_validates_arguments(kwargs, message):
    args = dict(step=0, total_steps=10, p0=0.0, stage1_ratio=0.75, shape="linear") | kwargs
    with pytest.raises(ValueError, match=message):
        coto_prob(**args)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Toy(nn.Module):
    def __init__(self, n_blocks, d=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def toy_model(n_blocks=4, dtype=torch.float64):
    """Adapters on fc1 and fc2 of every block, with B != 0 so that each one changes the output."""
    torch.manual_seed(0)
    model = Toy(n_blocks).to(dtype)
    inject_lora(model, ["fc1", "fc2"], r=1, alpha=1.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    return model


def reference(model, x, on):
    """The toy model written out in float64 on the CPU: block i's adapters are on iff on[i]."""
    def linear(layer, h, active):
        y = F.linear(h, layer.base.weight.double().cpu(), layer.base.bias.double().cpu())
        A, B = layer.lora_A.double().cpu(), layer.lora_B.double().cpu()
        return y + layer.scaling * h @ A.T @ B.T if active else y

    h = x.double().cpu()
    for block, active in zip(model.blocks, on):
        h = h + linear(block.fc2, torch.relu(linear(block.fc1, h, active)), active)
    return F.linear(h, model.head.weight.double().cpu(), model.head.bias.double().cpu())


def test_grouping_rule_and_override():
    assert block_of("blocks.3.attn.qkv") == "blocks.3"
    assert block_of("transformer.h.11.mlp.c_fc") == "transformer.h.11"
    assert block_of("base_model.model.transformer.h.5.attn.c_attn") == "base_model.model.transformer.h.5"
    assert block_of("base_model.model.model.layers.3.self_attn.q_proj") == "base_model.model.model.layers.3"
    with pytest.raises(ValueError, match="no integer component"):
        block_of("mlp.fc1")
    model = toy_model()
    groups = block_groups(model)
    layers = lora_layers(model)
    assert list(groups) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert groups["blocks.2"] == [layers["blocks.2.fc1"], layers["blocks.2.fc2"]]
    per_module = block_groups(model, group_of=lambda name: name)
    assert list(per_module) == list(layers)
    with pytest.raises(ValueError, match="no adapter layers"):
        block_groups(nn.Linear(2, 2))


def test_any_module_with_an_active_flag_is_an_adapter_layer():
    """coto.py needs no lora.py: a module of the user's own with a boolean `active` is driven too."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.delta = nn.Linear(2, 2)
            self.active = True

        def forward(self, x):
            return x + self.delta(x) if self.active else x

    model = nn.Sequential(Gated(), Gated())
    groups = block_groups(model)
    assert list(groups) == ["0", "1"]
    coto = CoTo(groups, total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    x = torch.randn(4, 2)
    expected = x
    for on, layer in zip(mask, model):
        expected = expected + layer.delta(expected) if on else expected
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p0", [0.0, 0.3])
def test_activation_frequency_matches_p_with_the_at_least_one_rule(p0):
    """P(group on) = p + (1 - p)^n / n: the fallback switches on one of n groups when none is."""
    n, draws = 4, 20000
    coto = CoTo(block_groups(toy_model(n)), total_steps=1000, p0=p0, stage1_ratio=1.0, seed=0)
    counts = torch.zeros(n)
    for _ in range(draws):
        mask = coto.step(0)
        assert mask.any()
        counts += mask
    p = coto_prob(0, 1000, p0, 1.0)
    expected = p + (1 - p) ** n / n
    stderr = math.sqrt(expected * (1 - expected) / draws)
    assert (counts / draws - expected).abs().max() < 4.5 * stderr
    if p0 == 0.0:  # p = 0: exactly one group, uniformly
        assert counts.sum() == draws


def test_same_seed_same_masks_and_global_rng_untouched():
    groups = block_groups(toy_model(6))

    def masks(seed):
        coto = CoTo(groups, total_steps=50, seed=seed)
        drawn = torch.stack([coto.step(t) for t in range(50)])
        coto.remove()
        return drawn

    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    a = masks(0)
    assert torch.equal(torch.rand(5), expected)  # drawing masks consumed no global randomness
    assert torch.equal(a, masks(0))
    assert not torch.equal(a, masks(1))


def test_state_dict_round_trip_continues_the_sequence():
    groups = block_groups(toy_model(6))
    coto = CoTo(groups, total_steps=40, p0=0.1, seed=7)
    for t in range(15):
        coto.step(t)
    state = coto.state_dict()
    rest = torch.stack([coto.step(t) for t in range(15, 40)])

    model = toy_model(6)
    resumed = CoTo(block_groups(model), total_steps=40, p0=0.1, seed=999)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.mask, state["mask"])
    x = torch.randn(2, 3, dtype=torch.float64)
    model.train()  # the loaded mask is in force at once, as after the step that drew it
    torch.testing.assert_close(model(x), reference(model, x, state["mask"]), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.stack([resumed.step(t) for t in range(15, 40)]), rest)
    coto.remove()
    with pytest.raises(ValueError, match="total_steps is 40 in the state but 41 here"):
        CoTo(groups, total_steps=41, p0=0.1).load_state_dict(state)


def test_training_mode_uses_the_mask_and_eval_mode_every_adapter(device):
    """The mask acts on training-mode forward passes only; afterwards every switch is as before."""
    model = toy_model(5).to(device)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    for t in range(3):
        mask = coto.step(t)
        assert not mask.all()
        model.train()
        y = model(x.to(device))
        torch.testing.assert_close(y.cpu(), reference(model, x, mask), rtol=1e-12, atol=1e-12)
        y.sum().backward()
        for on, layers in zip(mask, coto.groups.values()):
            for layer in layers:
                assert (layer.lora_A.grad is not None) == bool(on) and (layer.lora_B.grad is None) == (not on)
                assert layer.active  # the switch CoTo turned off for the forward pass is back on
        model.zero_grad(set_to_none=True)
        model.eval()
        torch.testing.assert_close(model(x.to(device)).cpu(), reference(model, x, [True] * 5),
                                   rtol=1e-12, atol=1e-12)


def test_explicit_switches_hold_in_both_modes_and_coto_keeps_them(device):
    model = toy_model(4).to(device)
    coto = CoTo(block_groups(model), total_steps=10, p0=1.0, seed=0)  # p = 1: CoTo switches nothing off
    x = torch.randn(4, 3, dtype=torch.float64).to(device)
    set_active(coto.groups, [True, False, True, True])
    coto.step(0)
    for mode in (model.train, model.eval):
        mode()
        torch.testing.assert_close(model(x).cpu(), reference(model, x, [True, False, True, True]),
                                   rtol=1e-12, atol=1e-12)
    with active_mask(coto.groups, [False, False, False, True]):  # an analysis' coalition, in eval mode
        torch.testing.assert_close(model(x).cpu(), reference(model, x, [False, False, False, True]),
                                   rtol=1e-12, atol=1e-12)
    assert [layer.active for layer in lora_layers(model).values()] == [True] * 2 + [False] * 2 + [True] * 4
    coto.p0 = 0.0
    coto.total_steps = 100
    mask = coto.step(0)  # now CoTo drops blocks as well: a block is on iff both say so
    model.train()
    both = [bool(m) and e for m, e in zip(mask, [True, False, True, True])]
    torch.testing.assert_close(model(x).cpu(), reference(model, x, both), rtol=1e-12, atol=1e-12)
    assert [layer.active for layer in lora_layers(model).values()] == [True] * 2 + [False] * 2 + [True] * 4


def test_active_mask_restores_on_exception_and_checks_length():
    model = toy_model(5)
    groups = block_groups(model)
    groups["blocks.1"][0].active = False
    before = [layer.active for layer in lora_layers(model).values()]
    with pytest.raises(RuntimeError), active_mask(groups, [False] * 5):
        raise RuntimeError("restored even on an exception")
    assert [layer.active for layer in lora_layers(model).values()] == before
    with pytest.raises(ValueError, match="mask has 2 entries for 5 groups"):
        active_mask(groups, [True, False]).__enter__()


def test_training_forward_before_the_first_step_is_an_error():
    model = toy_model(3)
    coto = CoTo(block_groups(model), total_steps=10)
    x = torch.randn(2, 3, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)
    model.train()
    with pytest.raises(RuntimeError, match=r"call coto.step\(step\) before each optimizer step"):
        model(x)
    coto.step(0)
    model(x)


def test_a_forward_that_raised_leaves_no_adapter_switched_off():
    model = toy_model(3)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    off = int((~mask).nonzero()[0])
    model.train()
    with pytest.raises(RuntimeError):  # fc1 was switched off, then its base layer raised
        model.blocks[off].fc1(torch.randn(2, 5, dtype=torch.float64))
    model.eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError):
        model.train().blocks[off].fc1(torch.randn(2, 5, dtype=torch.float64))
    set_active(coto.groups, [True] * 3)  # an explicit switch wins over the interrupted bypass
    model.eval()
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)
    assert all(layer.active for layer in lora_layers(model).values())
    with pytest.raises(RuntimeError):
        model.train().blocks[off].fc1(torch.randn(2, 5, dtype=torch.float64))
    coto.remove()  # and so does taking CoTo off
    assert all(layer.active for layer in lora_layers(model).values())


def test_remove_and_one_coto_per_model():
    model = toy_model(3)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    coto.step(0)
    with pytest.raises(ValueError, match=r"already driven by another CoTo: call its remove\(\)"):
        CoTo(block_groups(model), total_steps=10)
    coto.remove()
    coto.remove()  # idempotent
    x = torch.randn(2, 3, dtype=torch.float64)
    model.train()
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)
    CoTo(block_groups(model), total_steps=10)  # free again


def test_masks_are_honoured_inside_compiled_blocks():
    """train_vit --compile compiles every block: the mask must reach the adapters inside them, with
    no graph break and no graph per block (blocks of one shape share the on / off graphs)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = toy_model(8, dtype=torch.float32)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    coto = CoTo(block_groups(model), total_steps=12, p0=0.0, seed=1)
    x = torch.randn(5, 3)
    for t in range(6):
        mask = coto.step(t)
        model.train()
        y = model(x)
        torch.testing.assert_close(y.double(), reference(model, x, mask), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        for on, layers in zip(mask, coto.groups.values()):
            assert all((layer.lora_B.grad is not None) == bool(on) for layer in layers)
        model.zero_grad(set_to_none=True)
        model.eval()
        torch.testing.assert_close(model(x).double(), reference(model, x, [True] * 8), rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # adapters on / off in training, eval, and the first block (its input needs no grad): a
    # handful of graphs shared by the 8 blocks, not one or two per block
    assert counters["stats"]["unique_graphs"] <= 6, counters["stats"]
    torch._dynamo.reset()


@pytest.mark.parametrize("make,error,match", [
    (lambda m: CoTo(list(block_groups(m).values()), 10), TypeError,
     r"groups must be a dict \{group name: \[adapter layers\]\}, got a list: build it with block_groups"),
    (lambda m: CoTo(lora_layers(m), 10), TypeError,
     r"groups\['blocks.0.fc1'\] must be a list of adapter layers, got a LoRALinear"),
    (lambda m: CoTo({"blocks.0": [m.blocks[0].fc1, m.head]}, 10), TypeError,
     r"groups\['blocks.0'\] holds a Linear, which is not an adapter layer"),
    (lambda m: CoTo({"a": [m.blocks[0].fc1], "b": [m.blocks[0].fc1]}, 10), ValueError,
     r"groups\['b'\] repeats a layer"),
    (lambda m: CoTo({}, 10), ValueError, "at least one group"),
    (lambda m: CoTo(block_groups(m), 10, p0="0.1"), TypeError, r"p0='0.1' must be a number"),
    (lambda m: CoTo(block_groups(m), 10, stage1_ratio=None), TypeError,
     r"stage1_ratio=None must be a number"),
    (lambda m: CoTo(block_groups(m), 10, p0=float("nan")), ValueError, r"p0=nan is a probability"),
    (lambda m: CoTo(block_groups(m), True), ValueError, r"total_steps=True must be a positive integer"),
    (lambda m: CoTo(block_groups(m), 10, seed="0"), TypeError, r"seed='0' must be an integer"),
    (lambda m: CoTo(block_groups(m), 10).step(2.5), ValueError, r"step=2.5 must be an integer"),
    (lambda m: set_active([m.blocks[0].fc1], [True]), TypeError, r"groups must be a dict"),
])
def test_bad_arguments_name_the_argument_and_the_fix(make, error, match):
    with pytest.raises(error, match=match):
        make(toy_model(2))


def test_bad_state_names_what_is_wrong():
    groups = block_groups(toy_model(2))
    coto = CoTo(groups, total_steps=10)
    state = coto.state_dict()
    del state["generator"]
    with pytest.raises(ValueError, match=r"CoTo state lacks generator: pass the dict CoTo.state_dict"):
        coto.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be the dict CoTo.state_dict"):
        coto.load_state_dict([1, 2])
