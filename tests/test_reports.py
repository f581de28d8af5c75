"""lab/reports.py against direct evaluation: each report's numbers recomputed with plain forward passes,
another task's head, the q/k/v-only and the rescaled adapters against explicit tensors, and the
interpolation path against its two end adapters."""
import pytest
import torch

from coto import block_groups
from games import DELTA, coalition, delta_state, interpolate, prune_factors, prune_magnitude, split_state, use_adapter
from lab.reports import (adapter_report, combine_report, connectivity, keep_qkv, pair_report, rescale_to_norm,
                         use_task)
from lora import lora_layers, lora_state_dict
from test_games import TOL, data, two_adapters


def acc_fn(x, y):
    return lambda m: (m(x).argmax(-1) == y).double().mean().item()


def test_connectivity_ends_at_the_two_adapters_and_checks_lambdas_first(device):
    model, a, b = two_adapters()
    model.to(device)
    x, y = (t.to(device) for t in data())
    evaluate = acc_fn(x, y)
    with torch.no_grad():
        with use_adapter(model, a):
            va = evaluate(model)
        with use_adapter(model, b):
            vb = evaluate(model)
        with use_adapter(model, interpolate(a, b, 0.5)):
            vmid = evaluate(model)
        for space in ("factors", "delta"):
            curve = connectivity(model, evaluate, a, b, space=space)
            assert curve["values"][0] == va and curve["values"][-1] == vb
        assert curve["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert connectivity(model, evaluate, a, b, lambdas=(0, 0.5, 1))["midpoint"] == vmid
    calls = []
    with pytest.raises(ValueError, match="contain 0.5"):  # before any evaluation
        connectivity(model, lambda m: calls.append(1) or 0.0, a, b, lambdas=(0, 0.3, 1))
    assert calls == []
    with pytest.raises(ValueError, match="space='weights'"):
        connectivity(model, evaluate, a, b, space="weights")


def test_keep_qkv_keeps_only_one_projection(device):
    model, a, _ = two_adapters()
    d = {k: t.to(device) for k, t in delta_state(model, a).items()}
    q = keep_qkv(d, "k")
    W = d["blocks.0.attn.qkv.delta_weight"]
    assert q["blocks.0.attn.qkv.delta_weight"].device == W.device
    assert torch.equal(q["blocks.0.attn.qkv.delta_weight"][16:32], W[16:32])
    assert q["blocks.0.attn.qkv.delta_weight"][[*range(16), *range(32, 48)]].abs().sum() == 0
    assert q["blocks.0.mlp.fc1.delta_weight"].abs().sum() == 0
    assert torch.equal(q["head.weight"], d["head.weight"])
    with pytest.raises(ValueError, match="no 'qkv' delta_weight in the state"):
        keep_qkv(a, "q")  # a factor state: it would zero nothing, silently
    with pytest.raises(ValueError, match="47 rows, not a multiple of 3"):
        keep_qkv({f"blocks.0.attn.qkv.{DELTA}": torch.ones(47, 16)}, "q")
    with pytest.raises(ValueError, match="part='qk'"):
        keep_qkv(d, "qk")


@pytest.mark.parametrize("variant", ["lora", "hira"])
def test_rescale_to_norm_matches_each_layers_norm_and_keeps_directions(variant):
    model, a, b = two_adapters(variant)
    got = rescale_to_norm(model, a, b)
    assert torch.equal(got["head.weight"], a["head.weight"])  # the state's own head
    for name, layer in lora_layers(model).items():
        assert torch.equal(got[f"{name}.lora_A"], a[f"{name}.lora_A"])
        W = layer.base.weight.detach().double()

        def delta(s):  # float64 reference: s * B A, or s * W * (B A) for HiRA
            BA = s[f"{name}.lora_B"].double() @ s[f"{name}.lora_A"].double()
            return layer.scaling * (W * BA if variant == "hira" else BA)
        d_got, d_a, d_b = delta(got), delta(a), delta(b)
        assert d_got.norm().item() == pytest.approx(d_b.norm().item(), rel=1e-5)
        c = d_b.norm() / d_a.norm()
        assert torch.allclose(d_got, c * d_a, atol=1e-5)  # same direction, the reference's size
    with pytest.raises(ValueError, match="dora layer"):
        rescale_to_norm(*two_adapters("dora"))
    with pytest.raises(ValueError, match="reference lacks blocks.0.attn.qkv.lora_A"):
        rescale_to_norm(model, a, {"head.weight": a["head.weight"]})


def test_reports_agree_with_direct_evaluation(device):
    model, a, b = two_adapters()
    x, y = data()
    direct = {}  # the reference: plain forward passes on the CPU
    with use_adapter(model, a), torch.no_grad():
        with coalition(block_groups(model), [0, 2]):
            direct["every_other"] = -torch.nn.functional.cross_entropy(model(x), y).item()
        with use_adapter(model, prune_magnitude(delta_state(model), 0.5)):
            direct["0.5"] = -torch.nn.functional.cross_entropy(model(x), y).item()
        with use_adapter(model, prune_factors(lora_state_dict(model), 0.5)):
            direct["factors 0.5"] = -torch.nn.functional.cross_entropy(model(x), y).item()
        y_full = model(x).argmax(-1)  # labels the adapted model gets right: the adapters gain
    model.to(device)  # the data stays on the CPU
    with use_adapter(model, a):
        rep = adapter_report(model, x, y, "neg_loss", batch_size=16)
        gained = adapter_report(model, x, y_full, "acc")
    assert rep["structured"]["every_other"] == pytest.approx(direct["every_other"], abs=TOL[device.type])
    assert rep["unstructured"]["0.5"] == pytest.approx(direct["0.5"], abs=TOL[device.type])
    assert rep["unstructured_factors"]["0.5"] == pytest.approx(direct["factors 0.5"], abs=TOL[device.type])
    assert rep["unstructured_factors"]["0.5"] != pytest.approx(rep["unstructured"]["0.5"], abs=1e-4)
    assert rep["block_evals"] < rep["naive_block_evals"]
    # random adapters hurt here: no gain to share, so no shares (phi / sum(phi) would flip signs)
    assert rep["full"] < rep["none"] and rep["share"] is None and rep["top_third_share"] is None
    gain = gained["full"] - gained["none"]
    assert gained["full"] == 1.0 and gain > 0
    assert gained["share"] == pytest.approx([phi / gain for phi in gained["shapley"]])
    assert sum(gained["share"]) == pytest.approx(1)
    # combining a task's adapter with a copy of itself changes nothing; heads stay per task
    sets = {"t1": (x, y), "t2": (x, (y + 1) % 3)}
    combined = combine_report(model, {"t1": a, "t2": {**a, "head.weight": b["head.weight"]}}, sets, "acc")
    for name in ("fusion", "delta_avg"):
        assert combined[name] == pytest.approx(combined["single"], abs=1e-12)


def test_the_ensemble_averages_the_task_models_probabilities_under_the_scored_tasks_head():
    model, a, b = two_adapters()
    x, y = data()
    (adapter_a, head_a), (adapter_b, head_b) = split_state(model, a), split_state(model, b)
    sets = {"t1": (x, y), "t2": (x, (y + 1) % 3)}
    for value in ("acc", "neg_loss"):
        rep = combine_report(model, {"t1": a, "t2": b}, sets, value, batch_size=7)
        for t, head in (("t1", head_a), ("t2", head_b)):
            with torch.no_grad():
                probs = []
                for adapter in (adapter_a, adapter_b):
                    with use_adapter(model, {**adapter, **head}):
                        probs.append(model(x).double().softmax(-1))
            mean, labels = (probs[0] + probs[1]) / 2, sets[t][1]
            want = ((mean.argmax(-1) == labels).double().mean() if value == "acc"
                    else mean[torch.arange(len(labels)), labels].log().mean())
            assert rep["ensemble"][t] == pytest.approx(want.item(), abs=1e-6)
        assert rep["ensemble"] != pytest.approx(rep["single"], abs=1e-4)


def test_pair_report_can_hold_the_head_of_seed_a():
    model, a, b = two_adapters()
    x, y = data()
    rep = pair_report(model, a, b, x, y, "neg_loss")
    (adapter_a, head_a), (adapter_b, head_b) = split_state(model, a), split_state(model, b)
    assert set(head_a) == {"head.weight"} and not torch.equal(head_a["head.weight"], head_b["head.weight"])
    neg_loss = lambda: -torch.nn.functional.cross_entropy(model(x), y).item()  # noqa: E731
    with torch.no_grad():
        with use_adapter(model, {**interpolate(adapter_a, adapter_b, 0.5), **head_a}):
            held = neg_loss()
        with use_adapter(model, {**adapter_b, **head_a}):
            b_under_head_a = neg_loss()
        with use_adapter(model, interpolate(a, b, 0.5)):
            both = neg_loss()
    assert rep["factors_head_a"]["midpoint"] == pytest.approx(held, abs=1e-6)
    assert rep["factors_head_a"]["values"][-1] == pytest.approx(b_under_head_a, abs=1e-6)
    assert rep["factors"]["midpoint"] == pytest.approx(both, abs=1e-6) and both != pytest.approx(held, abs=1e-4)
    assert rep["factors_head_a"]["values"][0] == rep["factors"]["values"][0]  # both start at a


def test_use_task_takes_another_tasks_head_and_gives_it_back(device):
    model, a, _ = two_adapters()
    model.to(device)
    x = data()[0].to(device)
    head = {"head.weight": torch.randn(5, 16), "head.bias": torch.randn(5)}  # on the CPU
    own_head = model.head
    with torch.no_grad():
        before = model(x)
        with use_task(model, {**a, **head}):
            assert model.head is not own_head and not model.head.training
            feats = model.norm(torch.nn.Sequential(*model.blocks)(model.embed(x)))[:, 0]  # (B, D)
            ref = feats.cpu().double() @ head["head.weight"].T.double() + head["head.bias"].double()
            assert torch.allclose(model(x).cpu().double(), ref, atol=TOL[device.type])
        assert torch.equal(model(x), before) and model.head is own_head
        with pytest.raises(RuntimeError, match="inside the block"):
            with use_task(model, {**delta_state(model, a), **head}):
                assert model.head is not own_head and not any(layer.active for layer in lora_layers(model).values())
                raise RuntimeError("an error inside the block")
        assert torch.equal(model(x), before) and model.head is own_head  # W, head and flags back after an error
        with pytest.raises(ValueError, match="not a parameter"):  # checked before the head is swapped
            with use_task(model, {**head, "blocks.0.attn.qkv.lora_C": torch.zeros(1)}):
                pass
        assert model.head is own_head
