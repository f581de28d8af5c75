"""CoTo's schedule and controller against explicit formulas and counts."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from coto import CoTo, block_groups, block_of, coto_prob
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
    (dict(p0=1.5), r"p0=1.5 and stage1_ratio=0.75 must both be in \[0, 1\]"), (dict(p0=-0.1), "p0=-0.1"),
    (dict(p0=float("nan")), "p0=nan"), (dict(stage1_ratio=1.2), "stage1_ratio=1.2"),
    (dict(total_steps=0), "total_steps=0 must be an integer >= 1"), (dict(total_steps=True), "total_steps=True"),
    (dict(shape="cosine"), "unknown shape 'cosine': choose one of linear, exp, sine, constant"),
    (dict(step=-1), "step=-1 must be an integer >= 0"), (dict(step=2.5), "step=2.5 must be an integer"),
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


def test_numpy_integers_are_steps_totals_and_seeds():
    assert coto_prob(np.int64(3), np.int32(10), 0.1) == coto_prob(3, 10, 0.1)
    groups = block_groups(toy_model(4))
    a = CoTo(groups, np.int64(20), p0=0.0, seed=np.int64(5))
    masks = torch.stack([a.step(t) for t in np.arange(20)])  # numpy's own step counter
    b = CoTo(groups, 20, p0=0.0, seed=5)
    assert torch.equal(masks, torch.stack([b.step(t) for t in range(20)]))
    assert a.state_dict()["total_steps"] == 20


def model_with(names):
    """A module tree with an nn.Linear at each dotted name (children named "0", "1", ... as in
    nn.Sequential), adapted with LoRA at every one of them."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, nn.Linear(2, 2))
    inject_lora(root, names, r=1, alpha=1.0)
    return root


SCHEMES = {  # the naming schemes of common models -> (their adapted layers, the expected blocks)
    "timm ViT": ([f"blocks.{i}.{m}" for i in range(3) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
                 [f"blocks.{i}" for i in range(3)]),
    "HF GPT-2": ([f"transformer.h.{i}.{m}" for i in range(3) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")],
                 [f"transformer.h.{i}" for i in range(3)]),
    "LLaMA under PEFT": ([f"base_model.model.model.layers.{i}.{m}" for i in range(3)
                          for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")],
                         [f"base_model.model.model.layers.{i}" for i in range(3)]),
    "torchvision ViT": ([f"encoder.layers.encoder_layer_{i}.{m}" for i in range(3)
                         for m in ("self_attention.out_proj", "mlp.0", "mlp.3")],
                        [f"encoder.layers.encoder_layer_{i}" for i in range(3)]),
    "timm Swin": ([f"layers.{s}.blocks.{b}.{m}" for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)
                   for m in ("attn.qkv", "mlp.fc1")],
                  [f"layers.{s}.blocks.{b}" for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)]),
    "torchvision Swin": ([f"features.{s}.{b}.{m}" for s in (1, 3) for b in range(2) for m in ("attn.qkv", "mlp.0")],
                         [f"features.{s}.{b}" for s in (1, 3) for b in range(2)]),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_group_per_block_on_common_naming_schemes(scheme):
    names, blocks = SCHEMES[scheme]
    model = model_with(names)
    groups = block_groups(model)
    assert list(groups) == blocks
    layers = lora_layers(model)
    for block, group in groups.items():  # each block's own adapters, in module order
        assert group == [layer for name, layer in layers.items() if name.startswith(block + ".")]
    assert f"CoTo({len(blocks)} groups, {len(names)} layers: {blocks[0]} .. {blocks[-1]};" in repr(CoTo(groups, 10))


def test_grouping_rule_and_override():
    assert block_of("blocks.3.attn.qkv") == "blocks.3"
    assert block_of("blocks.3.mlp.fc1") == "blocks.3"  # fc1 is the layer's own name, not an index
    assert block_of("transformer.h.11.mlp.c_fc") == "transformer.h.11"
    assert block_of("base_model.model.transformer.h.5.attn.c_attn") == "base_model.model.transformer.h.5"
    assert block_of("layers.2") == "layers.2" and block_of("0") == "0"  # a list of adapted layers: one each
    for name in ("mlp.fc1", "head", "attn2.to_q"):
        with pytest.raises(ValueError, match=r"no index in .* pass block_groups group_of=callable\(name\)"):
            block_of(name)
    model = toy_model()
    groups = block_groups(model)
    layers = lora_layers(model)
    assert list(groups) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert groups["blocks.2"] == [layers["blocks.2.fc1"], layers["blocks.2.fc2"]]
    per_module = block_groups(model, group_of=lambda name: name)
    assert list(per_module) == list(layers)
    assert repr(CoTo(per_module, 10)).startswith("CoTo(8 groups, 8 layers: blocks.0.fc1 .. blocks.3.fc2;")
    with pytest.raises(ValueError, match="no adapter layers"):
        block_groups(nn.Linear(2, 2))


def test_any_module_with_an_active_flag_is_an_adapter_layer():
    """coto.py needs no lora.py: a module of the user's own with a boolean `active`, whose forward
    honours `coto_on` in training mode, is driven too."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.delta = nn.Linear(2, 2)
            self.active = True

        def forward(self, x):
            on = self.active and (not self.training or self.coto_on)
            return x + self.delta(x) if on else x

    model = nn.Sequential(Gated(), Gated())
    groups = block_groups(model)
    assert list(groups) == ["0", "1"]
    coto = CoTo(groups, total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    assert mask.sum() == 1
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
    assert torch.equal(resumed.mask, state["mask"]) and resumed.p == state["p"]
    x = torch.randn(2, 3, dtype=torch.float64)
    model.train()  # the loaded mask is in force at once, as after the step that drew it
    torch.testing.assert_close(model(x), reference(model, x, state["mask"]), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.stack([resumed.step(t) for t in range(15, 40)]), rest)
    coto.remove()
    with pytest.raises(ValueError, match="total_steps is 40 in it, 41 here"):
        CoTo(groups, total_steps=41, p0=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"names is \['blocks.0'"):
        CoTo(block_groups(toy_model(5)), total_steps=40, p0=0.1).load_state_dict(state)
    for key, other in (("p0", 0.2), ("stage1_ratio", 0.5), ("shape", "sine")):
        with pytest.raises(ValueError, match=f"{key} is"):
            CoTo(groups, total_steps=40, **{"p0": 0.1, key: other}).load_state_dict(state)


def test_training_mode_uses_the_mask_and_eval_mode_every_adapter(device):
    """The mask acts on training-mode forward passes only: bypassed layers get grad None; the
    user's `active` switch is never touched."""
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
                assert layer.coto_on == bool(on) and layer.active  # CoTo writes its flag, not the user's
        model.zero_grad(set_to_none=True)
        model.eval()
        torch.testing.assert_close(model(x.to(device)).cpu(), reference(model, x, [True] * 5),
                                   rtol=1e-12, atol=1e-12)


def test_explicit_switches_hold_in_both_modes_and_coto_keeps_them(device):
    model = toy_model(4).to(device)
    coto = CoTo(block_groups(model), total_steps=10, p0=1.0, seed=0)  # p = 1: CoTo switches nothing off
    x = torch.randn(4, 3, dtype=torch.float64).to(device)
    user = [True, False, True, True]
    for on, layers in zip(user, coto.groups.values()):
        for layer in layers:
            layer.active = on
    coto.step(0)
    for mode in (model.train, model.eval):
        mode()
        torch.testing.assert_close(model(x).cpu(), reference(model, x, user), rtol=1e-12, atol=1e-12)
    coto.p0 = 0.0
    coto.total_steps = 100
    mask = coto.step(0)  # now CoTo drops blocks as well: a block trains iff both say so
    model.train()
    both = [bool(m) and u for m, u in zip(mask, user)]
    torch.testing.assert_close(model(x).cpu(), reference(model, x, both), rtol=1e-12, atol=1e-12)
    model.eval()  # and evaluates with the user's switches alone
    torch.testing.assert_close(model(x).cpu(), reference(model, x, user), rtol=1e-12, atol=1e-12)
    assert [layer.active for layer in lora_layers(model).values()] == [True] * 2 + [False] * 2 + [True] * 4


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


def test_a_forward_that_raised_in_a_bypassed_layer_leaves_no_adapter_off():
    """CoTo switches nothing around a forward pass, so an exception inside one leaves every switch
    as it was: an analysis that saves and restores `active` (games.coalition) restores True."""
    model = toy_model(3)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    off = int((~mask).nonzero()[0])
    model.train()
    with pytest.raises(RuntimeError):  # a bypassed layer whose base layer raises (wrong width)
        model.blocks[off].fc1(torch.randn(2, 5, dtype=torch.float64))
    layers = list(lora_layers(model).values())
    saved = [layer.active for layer in layers]  # what a coalition records before switching
    assert saved == [True] * 6
    x = torch.randn(2, 3, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)
    model.train()  # the draw still holds for the rest of the step, no more than that
    torch.testing.assert_close(model(x), reference(model, x, mask), rtol=1e-12, atol=1e-12)
    coto.remove()
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)


def test_remove_and_a_second_coto_takes_the_layers_over():
    model = toy_model(3)
    first = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    first.step(0)
    second = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=1)  # takes over, not stepped yet
    x = torch.randn(2, 3, dtype=torch.float64)
    model.train()
    with pytest.raises(RuntimeError, match=r"call coto.step\(step\)"):
        model(x)
    mask = second.step(0)
    torch.testing.assert_close(model(x), reference(model, x, mask), rtol=1e-12, atol=1e-12)
    second.remove()
    second.remove()  # idempotent
    assert all(layer.coto_on is True for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x), reference(model, x, [True] * 3), rtol=1e-12, atol=1e-12)


def test_a_deep_copy_keeps_the_last_draw_until_its_own_coto_steps_or_is_removed():
    model = toy_model(4)
    coto = CoTo(block_groups(model), total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    twin = copy.deepcopy(model).train()
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(twin(x), reference(twin, x, mask), rtol=1e-12, atol=1e-12)  # documented
    coto.step(1)
    coto.remove()  # the original's CoTo does not reach the copy
    torch.testing.assert_close(twin(x), reference(twin, x, mask), rtol=1e-12, atol=1e-12)
    own = CoTo(block_groups(twin), total_steps=10, p0=1.0)  # a CoTo of its own takes the copy over
    assert torch.equal(own.step(0), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(twin(x), reference(twin, x, [True] * 4), rtol=1e-12, atol=1e-12)
    own.remove()
    assert all(layer.coto_on is True for layer in lora_layers(twin).values())


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
    (lambda m: CoTo(list(block_groups(m).values()), 10), AttributeError, "values"),
    (lambda m: CoTo(lora_layers(m), 10), TypeError, "not iterable"),
    (lambda m: CoTo({"blocks.0": [m.blocks[0].fc1, m.head]}, 10), TypeError,
     r"groups must be a non-empty dict \{group name: \[adapter layer, ...\]\}.*build it with block_groups"),
    (lambda m: CoTo({"a": [m.blocks[0].fc1], "b": [m.blocks[0].fc1]}, 10), ValueError,
     r"a layer is in two groups"),
    (lambda m: CoTo({}, 10), TypeError, "non-empty dict"),
    (lambda m: CoTo(block_groups(m), 10, p0="0.1"), TypeError, r"'<=' not supported"),
    (lambda m: CoTo(block_groups(m), 10, stage1_ratio=None), TypeError, r"'<=' not supported"),
    (lambda m: CoTo(block_groups(m), 10, p0=float("nan")), ValueError, r"p0=nan and stage1_ratio=0.75"),
    (lambda m: CoTo(block_groups(m), True), ValueError, r"total_steps=True must be an integer >= 1"),
    (lambda m: CoTo(block_groups(m), 10, seed="0"), TypeError, r"'str' object cannot be interpreted as an integer"),
    (lambda m: CoTo(block_groups(m), 10, seed=1.0), TypeError, r"'float' object cannot be interpreted"),
    (lambda m: CoTo(block_groups(m), 10).step(2.5), ValueError, r"step=2.5 must be an integer >= 0"),
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
    with pytest.raises(ValueError, match="CoTo state lacks generator"):
        coto.load_state_dict([1, 2])
