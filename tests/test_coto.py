"""CoTo's schedule and controller against explicit formulas and counts."""
import math

import pytest
import torch
import torch.nn as nn

from coto import CoTo, active_mask, block_groups, block_of, coto_prob
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


def toy_model(n_blocks=4):
    model = nn.Module()
    model.blocks = nn.ModuleList(
        nn.ModuleDict({"fc1": nn.Linear(3, 3), "fc2": nn.Linear(3, 3)}) for _ in range(n_blocks))
    model.head = nn.Linear(3, 2)
    inject_lora(model, ["fc1", "fc2"], r=1, alpha=1.0)
    return model


def test_grouping_rule_and_override():
    assert block_of("blocks.3.attn.qkv") == "blocks.3"
    assert block_of("transformer.h.11.mlp.c_fc") == "transformer.h.11"
    with pytest.raises(ValueError, match="no integer component"):
        block_of("mlp.fc1")
    model = toy_model()
    groups = block_groups(model)
    layers = lora_layers(model)
    assert list(groups) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert groups["blocks.2"] == [layers["blocks.2.fc1"], layers["blocks.2.fc2"]]
    per_module = block_groups(model, group_of=lambda name: name)
    assert list(per_module) == list(layers)
    with pytest.raises(ValueError, match="no LoRA layers"):
        block_groups(nn.Linear(2, 2))


def test_step_sets_active_per_group_from_the_mask():
    model = toy_model()
    coto = CoTo(block_groups(model), total_steps=100, p0=0.0, seed=3)
    for t in range(0, 100, 7):
        mask = coto.step(t)
        assert coto.p == coto_prob(t, 100, 0.0)
        for on, layers in zip(mask, coto.groups.values()):
            assert all(layer.active == bool(on) for layer in layers)


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
        return torch.stack([coto.step(t) for t in range(50)])

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

    resumed = CoTo(block_groups(toy_model(6)), total_steps=40, p0=0.1, seed=999)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.mask, state["mask"])
    assert torch.equal(torch.stack([resumed.step(t) for t in range(15, 40)]), rest)
    with pytest.raises(ValueError, match="total_steps is 40 in the state but 41 here"):
        CoTo(groups, total_steps=41, p0=0.1).load_state_dict(state)


def test_all_active_for_evaluation_then_restored():
    model = toy_model(5)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    assert mask.sum() == 1
    before = [layer.active for layer in lora_layers(model).values()]
    with coto.all_active():
        assert all(layer.active for layer in lora_layers(model).values())
    assert [layer.active for layer in lora_layers(model).values()] == before
    with pytest.raises(RuntimeError), active_mask(coto.groups, [False] * 5):
        raise RuntimeError("restored even on an exception")
    assert [layer.active for layer in lora_layers(model).values()] == before
    with pytest.raises(ValueError, match="mask has 2 entries for 5 groups"):
        active_mask(coto.groups, [True, False]).__enter__()
