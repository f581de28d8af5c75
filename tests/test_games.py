"""games.py against references that could disagree: Shapley axioms and games with known values,
brute-force permutation averages, naive per-coalition forward passes on a real (tiny) ViT, the
explicit cross-term formula of delta-W interpolation, and TIES and factor pruning worked out by hand."""
import itertools
import math

import numpy as np
import pytest
import torch

from coto import block_groups
from games import (DELTA, barrier, block_subsets, coalition, coalition_values, combine, combine_ties, delta_state,
                   interpolate, interpolate_delta, prune_factors, prune_magnitude, score, shapley_exact,
                   shapley_multilinear, shapley_permutation, use_adapter)
from lora import inject_lora, lora_layers, lora_state_dict, merge_lora
from vit import VisionTransformer


TOL = {"cpu": 1e-5, "cuda": 2e-3}  # the same model on another device (cuDNN may use TF32 convolutions)


def random_game(n, seed):
    table = torch.rand(2 ** n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table[0] = 0.0
    return table


def fn(table):
    return lambda S: float(table[sum(1 << i for i in S)])


# ---------------------------------------------------------------------------------------------
# Shapley values


def test_games_with_known_values():
    w = [0.5, -1.0, 2.0, 0.25]
    assert torch.allclose(shapley_exact(lambda S: sum(w[i] for i in S), 4), torch.tensor(w, dtype=torch.float64))
    # unanimity game on T = {1, 3}: 1/|T| each for T, 0 for the others
    assert torch.allclose(shapley_exact(lambda S: float({1, 3} <= S), 4),
                          torch.tensor([0, 0.5, 0, 0.5], dtype=torch.float64))
    # glove game: one left glove (0), two right gloves (1, 2); a pair is worth 1 -> (2/3, 1/6, 1/6)
    assert torch.allclose(shapley_exact(lambda S: float(0 in S and bool(S & {1, 2})), 3),
                          torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=torch.float64))


def test_axioms_on_random_games():
    n = 5
    v, u = random_game(n, 0), random_game(n, 1)
    phi = shapley_exact(v, n)
    assert math.isclose(phi.sum().item(), (v[-1] - v[0]).item(), abs_tol=1e-12)  # efficiency
    assert torch.allclose(shapley_exact(v + u, n), phi + shapley_exact(u, n))  # additivity
    # null player 4 and symmetric players 0, 1: build the game from a 3-player random one
    base = random_game(3, 2)
    sym = lambda S: float(base[(1 if S & {0, 1} else 0) + (2 if len(S & {0, 1}) == 2 else 0)
                               + (4 if 2 in S else 0)]) + (0.3 if 3 in S else 0.0)
    phi = shapley_exact(sym, n)
    assert phi[4] == 0.0 and math.isclose(phi[0], phi[1], abs_tol=1e-12)
    assert math.isclose(phi[3], 0.3, abs_tol=1e-12)  # additive part


def test_exact_equals_brute_force_permutation_average():
    n = 5
    table = random_game(n, 3)
    v = fn(table)
    brute = torch.zeros(n, dtype=torch.float64)
    for perm in itertools.permutations(range(n)):
        S = frozenset()
        for i in perm:
            brute[i] += v(S | {i}) - v(S)
            S = S | {i}
    brute /= math.factorial(n)
    assert torch.allclose(shapley_exact(v, n), brute, atol=1e-12)
    assert torch.allclose(shapley_exact(table, n), brute, atol=1e-12)  # table input


@pytest.mark.parametrize("estimator", [shapley_permutation, shapley_multilinear])
def test_sampled_estimators_within_stated_error(estimator):
    n = 6
    table = random_game(n, 4)
    exact = shapley_exact(table, n)
    g = torch.Generator().manual_seed(0)
    phi, se = estimator(fn(table), n, 400, generator=g)
    assert (se > 0).all() and ((phi - exact).abs() <= 4 * se).all()
    # the stated error is neither too small nor too large: ~95 % of +-2 se intervals cover
    hits = []
    for _ in range(150):
        phi, se = estimator(table, n, 30, generator=g)
        hits.append(((phi - exact).abs() <= 2 * se).double())
    coverage = torch.cat(hits).mean().item()
    assert 0.85 <= coverage <= 0.995, coverage


# ---------------------------------------------------------------------------------------------
# A real tiny ViT with non-zero adapters


def tiny_vit(variant="lora", depth=3, seed=0, targets=("qkv", "proj", "fc1", "fc2")):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
                              depth=depth, num_heads=2, mlp_ratio=2.0)
    inject_lora(model, list(targets), r=2, alpha=4, variant=variant)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)  # B = 0 would make every coalition the base model
            if variant == "dora":
                layer.lora_magnitude.mul_(1.3)
    return model.eval()


def data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def naive_values(model, groups, x, y):
    """One full forward pass per coalition, blocks counted with hooks: (acc table, -loss table, calls)."""
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in model.blocks]
    n = len(groups)
    acc, neg_loss = torch.zeros(2 ** n, dtype=torch.float64), torch.zeros(2 ** n, dtype=torch.float64)
    with torch.no_grad():
        for m in range(2 ** n):
            with coalition(groups, [i for i in range(n) if m >> i & 1]):
                logits = model(x)
            acc[m] = (logits.argmax(-1) == y).double().mean()
            neg_loss[m] = -torch.nn.functional.cross_entropy(logits, y)
    for h in hooks:
        h.remove()
    return acc, neg_loss, len(calls)


@pytest.mark.parametrize("per_module", [False, True])
def test_prefix_sharing_equals_naive_with_fewer_block_evaluations(per_module, device):
    if per_module:  # one player per LoRA layer: 2 blocks x 2 modules
        model = tiny_vit(depth=2, targets=("qkv", "fc2"))
        groups = block_groups(model, group_of=lambda name: name)
    else:  # one player per block
        model = tiny_vit(depth=4)
        groups = block_groups(model)
    x, y = data()  # stays on the CPU: coalition_values moves each batch to the model
    n, L, batches = len(groups), len(model.blocks), 3
    acc, neg_loss, naive_evals = naive_values(model, groups, x, y)  # the reference, on the CPU
    assert naive_evals == L * 2 ** n
    model.to(device)
    for value, ref in (("acc", acc), ("neg_loss", neg_loss)):
        got, evals = coalition_values(model.embed, model.blocks, model.forward_head, x, y, value,
                                      groups=groups, batch_size=16)  # 40 examples: 3 batches
        assert torch.allclose(got, ref, atol=TOL[device.type], rtol=0)
        # per batch: 2^(players in blocks 0..l) evaluations of block l
        assert evals == batches * ((2 ** 2 + 2 ** 4) if per_module else (2 ** (L + 1) - 2))
        assert evals < batches * naive_evals
    assert len(set(neg_loss.tolist())) == 2 ** n  # the adapters matter: every coalition differs
    assert all(layer.active for layer in lora_layers(model).values())  # flags restored
    if not per_module:  # default players: coto.block_groups of the blocks, the whole set in one batch
        default, evals = coalition_values(model.embed, model.blocks, model.forward_head, x, y, "neg_loss")
        assert torch.allclose(default, neg_loss, atol=TOL[device.type], rtol=0) and evals == 2 ** (L + 1) - 2


def test_coalition_restores_flags_and_rejects_bad_input():
    model = tiny_vit()
    groups = block_groups(model)
    list(groups.values())[2][0].active = False  # a previous state that is not "all on"
    before = [l.active for l in lora_layers(model).values()]
    with coalition(groups, {0, "blocks.2"}):
        assert [l.active for l in groups["blocks.1"]] == [False] * 4
        assert all(l.active for l in groups["blocks.0"] + groups["blocks.2"])
    assert [l.active for l in lora_layers(model).values()] == before
    for members in ({7}, [True, False], "blocks.0"):  # a bool mask or a bare name is no list of members
        with pytest.raises(ValueError, match="neither indices"), coalition(groups, members):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with coalition(groups, [1]):
            assert not groups["blocks.0"][0].active
            raise RuntimeError("an error inside the block")
    assert [l.active for l in lora_layers(model).values()] == before  # restored after an error too
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        coalition_values(model.embed, model.blocks, model.forward_head, *data(), "acc")


@pytest.mark.parametrize("variant", ["lora", "dora", "hira"])
def test_delta_state_reproduces_the_adapter(variant, device):
    model = tiny_vit(variant)
    x, _ = data()
    with torch.no_grad():
        cpu_ref = model(x)  # the reference, on the CPU
        model.to(device)
        x = x.to(device)
        ref = model(x)
        assert torch.allclose(ref.cpu(), cpu_ref, atol=TOL[device.type])
        deltas = delta_state(model)
        assert all(d.device.type == device.type for d in deltas.values())
        assert all(layer.active for layer in lora_layers(model).values())
        for layer in lora_layers(model).values():
            layer.active = False
        base = model(x)
        for layer in lora_layers(model).values():
            layer.active = True
        with use_adapter(model, {k: d.cpu() for k, d in deltas.items()}):  # W + delta, adapters bypassed
            got = model(x)
        assert torch.allclose(got, ref, atol=TOL[device.type]) and not torch.allclose(base, ref, atol=1e-2)
        assert torch.equal(model(x), ref)  # everything restored
        key = f"blocks.0.attn.qkv.{DELTA}"
        assert torch.equal(delta_state(model, deltas)[key], deltas[key])  # delta entries pass through


def two_adapters(variant="lora"):
    model = tiny_vit(variant, seed=0)
    a = {**lora_state_dict(model), "head.weight": model.head.weight.detach().clone()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    return model, a, b


def test_interpolation_endpoints_and_delta_cross_terms(device):
    model, a, b = two_adapters()
    model.to(device)
    b = {k: t.to(device) for k, t in b.items()}  # a stays on the CPU: each follows the model
    x = data()[0].to(device)
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(interpolate(a, b, 1.0)[k], b[k].cpu()) for k in a)  # on a's device
    with torch.no_grad():
        with use_adapter(model, b):
            ref = model(x)
        with use_adapter(model, interpolate(a, b, 1.0)):
            assert torch.equal(model(x), ref)
    # delta-W interpolation = factor interpolation + s * lam (1 - lam) (B_a - B_b)(A_a - A_b)
    lam, name = 0.3, "blocks.1.mlp.fc1"
    s = lora_layers(model)[name].scaling
    Aa, Ab, Ba, Bb = (t[f"{name}.{k}"].cpu().double() for t, k in ((a, "lora_A"), (b, "lora_A"),
                                                                   (a, "lora_B"), (b, "lora_B")))
    d = interpolate_delta(model, a, b, lam)[f"{name}.delta_weight"]
    f = delta_state(model, interpolate(a, b, lam))[f"{name}.delta_weight"]
    assert d.device.type == device.type  # delta W lives with the model
    assert torch.allclose((d - f).cpu().double(), s * lam * (1 - lam) * (Ba - Bb) @ (Aa - Ab), atol=1e-5)
    assert torch.equal(interpolate_delta(model, a, b, lam)["head.weight"].cpu(), interpolate(a, b, lam)["head.weight"])


def test_barrier_by_hand():
    assert barrier([0, 0.25, 0.5, 0.75, 1], [0.8, 0.5, 0.4, 0.7, 0.6]) == (pytest.approx(0.3), 0.4)
    assert barrier([0, 0.5, 1], [0.8, 0.9, 0.6]) == (0.0, 0.9)
    with pytest.raises(ValueError, match="contain 0.5"):
        barrier([0, 1], [1, 1])


def test_combining_an_adapter_with_itself_returns_it():
    model, a, _ = two_adapters("dora")
    d = delta_state(model, a)
    assert all(torch.allclose(combine([a, a, a], [1 / 3] * 3)[k], a[k]) for k in a)
    ties = combine_ties([d, d], density=1.0)
    assert all(torch.allclose(ties[k], d[k]) for k in d)


def test_ties_matches_hand_computation():
    t1 = {"w": torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 0.1]])}
    t2 = {"w": torch.tensor([[-2.0, -3.0, 1.0], [1.0, 5.0, -0.2]])}
    t3 = {"w": torch.tensor([[-0.5, 2.0, -6.0], [0.3, -1.0, 0.0]])}
    # trim to density 0.5 (3 of 6 kept):  t1 -> [3, 0, 0; 2, -4, 0]   t2 -> [-2, -3, 0; 0, 5, 0]
    #                                     t3 -> [0, 2, -6; 0, -1, 0]
    # elected sign of the sums [1, -1, -6; 2, 0, 0] -> [+, -, -; +, 0, 0]
    # disjoint means: 3 | -3 | -6 ; 2 | 0 (no agreeing value) | 0
    want = torch.tensor([[3.0, -3.0, -6.0], [2.0, 0.0, 0.0]])
    assert torch.equal(combine_ties([t1, t2, t3], density=0.5)["w"], want)
    assert torch.equal(combine_ties([t1, t2, t3], density=0.5, lam=0.5)["w"], want / 2)


def test_pruning_sparsity_and_named_blocks_only(device):
    model, a, _ = two_adapters()
    d = {k: t.to(device) for k, t in delta_state(model, a).items()}
    for sparsity in (0.3, 0.5, 0.7):
        p = prune_magnitude(d, sparsity)
        for k, t in d.items():
            if k.endswith("delta_weight"):
                zeroed = p[k] == 0
                assert zeroed.sum().item() == round(sparsity * t.numel())
                assert t[zeroed].abs().max() <= t[~zeroed].abs().min()  # the smallest ones
        assert torch.equal(p["head.weight"], d["head.weight"])
    # structured: keep blocks 0 and 2 of 3 == zeroing block 1's delta W, nothing else
    assert block_subsets(6) == {"every_other": [0, 2, 4], "low": [0, 1], "middle": [2, 3], "high": [4, 5]}
    assert block_subsets(2) == {"every_other": [0], "middle": [0], "high": [1]}  # no empty "low" third
    with pytest.raises(ValueError, match="n=0 must be an integer >= 1"):
        block_subsets(0)
    keep = block_subsets(3)["every_other"]
    x, _ = data()
    dropped = {k: torch.zeros_like(t) if k.startswith("blocks.1.") else t for k, t in d.items()}
    with torch.no_grad():
        with coalition(block_groups(model), keep), use_adapter(model, a):
            got = model(x)
        with use_adapter(model, dropped):
            ref = model(x)
        with use_adapter(model, d):
            full = model(x)
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, full, atol=1e-3)


def test_factor_pruning_by_hand():
    A = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])  # (r, in) = (2, 3)
    B = torch.tensor([[1.0, -0.3], [0.05, 4.0]])  # (out, r) = (2, 2)
    head = torch.tensor([0.01, 0.02])
    state = {"l.lora_A": A, "l.lora_B": B, "l.lora_magnitude": head, "head.weight": head}
    p = prune_factors(state, 0.5)  # 3 of A's 6 entries and 2 of B's 4 go; the rest is kept as it is
    assert torch.equal(p["l.lora_A"], torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, 1.0]]))
    assert torch.equal(p["l.lora_B"], torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert p["head.weight"] is head and p["l.lora_magnitude"] is head
    assert torch.equal(prune_factors(state, 0.0)["l.lora_A"], A)
    with pytest.raises(ValueError, match="takes a factor state"):
        prune_factors({f"l.{DELTA}": A}, 0.5)
    with pytest.raises(ValueError, match=r"sparsity=1.5 must be in \[0, 1\]"):
        prune_factors(state, 1.5)


def test_use_adapter_gives_everything_back_after_an_error():
    model, a, _ = two_adapters()
    x, _ = data()
    own_head, layers = model.head, lora_layers(model).values()
    with torch.no_grad():
        before = model(x)
    state = {**delta_state(model, a), "head.weight": torch.randn(3, 16), "head.bias": torch.randn(3)}
    with pytest.raises(RuntimeError, match="inside the block"):
        with use_adapter(model, state):
            assert torch.equal(model.head.bias, state["head.bias"]) and not any(layer.active for layer in layers)
            raise RuntimeError("an error inside the block")
    with torch.no_grad():
        assert torch.equal(model(x), before)  # W, the head and every active flag are the model's own again
    assert model.head is own_head and all(layer.active for layer in layers)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a silent wrong answer


@pytest.mark.parametrize("estimator", [shapley_permutation, shapley_multilinear])
def test_estimators_refuse_bad_counts(estimator):
    table = random_game(3, 0)
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"n={n!r} players must be >= 1"):
            estimator(fn(table), n, 8)
    for num_samples in (0, 1, -5, True):  # one sample has no standard error
        with pytest.raises(ValueError, match=f"num_samples={num_samples!r} >= 2"):
            estimator(table, 3, num_samples)
    for n, num_samples in ((2.0, 8), (3, 2.5), (3, "8")):  # Python's own errors are clear enough
        with pytest.raises(TypeError):
            estimator(table if n == 3 else fn(table), n, num_samples)
    with pytest.raises(ValueError, match="n=0 players must be >= 1"):
        shapley_exact(fn(table), 0)


def test_non_finite_game_values_are_refused():
    table = random_game(3, 0)
    table[5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite at bitmasks \[5\]"):
        shapley_exact(table, 3)
    with pytest.raises(ValueError, match=r"holds 8 finite values; got shape \(4,\)"):
        shapley_exact(table[:4], 3)
    with pytest.raises(ValueError, match=r"value_fn returned nan for coalition \[0, 2\]"):
        shapley_permutation(fn(table), 3, 20, generator=torch.Generator().manual_seed(0))


def test_barrier_refuses_nan_and_mismatched_curves():
    with pytest.raises(ValueError, match="must be finite"):
        barrier([0, 0.5, 1], [0.8, float("nan"), 0.6])  # max() would skip the NaN: barrier 0
    with pytest.raises(ValueError, match="3 lambdas but 2 values"):
        barrier([0, 0.5, 1], [0.8, 0.6])
    with pytest.raises(ValueError, match="must increase from 0 to 1"):
        barrier([0, 0.75, 0.5, 1], [1, 1, 1, 1])


def test_pruning_and_ties_refuse_factor_states():
    model, a, b = two_adapters()
    for f in (lambda s: prune_magnitude(s, 0.5), lambda s: combine_ties([s, s])):
        with pytest.raises(ValueError, match=r"holds factors \(blocks.0.attn.qkv.lora_A, ...\): pass delta_state"):
            f(a)  # it used to prune nothing, silently
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_magnitude({"head.weight": a["head.weight"]}, 0.5)
    with pytest.raises(ValueError, match="differ in the shape of"):
        combine([a, {**a, "head.weight": torch.zeros(5, 16)}], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"weights \[0.5, nan\]: give one finite weight per state"):
        combine([a, b], [0.5, float("nan")])
    with pytest.raises(ValueError, match="other keys than state 0"):
        combine([a, {k: v for k, v in a.items() if k != "head.weight"}], [0.5, 0.5])  # head.weight dropped


def test_evaluation_refuses_bad_data_and_modes():
    model = tiny_vit()
    x, y = data()
    groups = block_groups(model)
    def run(xs, ys, **kw):
        return coalition_values(model.embed, model.blocks, model.forward_head, xs, ys, **kw)

    for f in (lambda xs, ys, **kw: score(model, xs, ys, **kw), run):
        with pytest.raises(ValueError, match="x has 40 examples and y 1"):
            f(x, y[:1])  # y would broadcast: an "accuracy" above 1
        with pytest.raises(ValueError, match="x has 0 examples and y 0"):
            f(x[:0], y[:0])  # 0 / 0
        for batch_size in (0, -16):
            with pytest.raises(ValueError, match="batch_size="):
                f(x, y, batch_size=batch_size)  # a negative one used to give 0 without a word
        with pytest.raises(ValueError, match="value='accuracy': choose 'acc'"):
            f(x, y, value="accuracy")
    with pytest.raises(TypeError), coalition(groups, 1):  # Python says "'int' object is not iterable"
        pass
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        score(model, x, y)
    model.eval()
    unmerged = score(model, x, y, "neg_loss")
    merge_lora(model)
    assert score(model, x, y, "neg_loss") == pytest.approx(unmerged, abs=1e-5)  # evaluating is fine
    for f in (lambda: run(x, y), lambda: delta_state(model), lambda: coalition(groups, [0]).__enter__()):
        with pytest.raises(ValueError, match="unmerge_lora"):
            f()  # switching merged adapters off would do nothing: every coalition the same


def test_use_adapter_checks_every_key_before_changing_anything():
    model, a, _ = two_adapters()
    x, _ = data()
    with torch.no_grad():
        before = model(x)
    bad = {**a, "blocks.2.mlp.fc2.lora_A": torch.zeros(3, 32)}  # rank 3 where the model has 2
    with pytest.raises(ValueError, match=r"blocks.2.mlp.fc2.lora_A: shape \(3, 32\) in the state, \(2, 32\)"):
        with use_adapter(model, bad):
            pass
    with pytest.raises(ValueError, match=r"qkv.delta_weight: shape \(48, 8\) in the state, \(48, 16\)"):
        with use_adapter(model, {f"blocks.0.attn.qkv.{DELTA}": torch.zeros(48, 8)}):
            pass
    with pytest.raises(ValueError, match="not a parameter"):
        with use_adapter(model, {"blocks.0.attn.qkv.lora_C": torch.zeros(1)}):
            pass
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_numpy_integers_are_accepted():
    # indices and counts often come out of numpy (np.arange, np.int64 from a saved table)
    model = tiny_vit()
    groups = block_groups(model)
    x, y = data()
    with coalition(groups, np.array([0, 2])):
        got = score(model, x, y, "neg_loss", batch_size=np.int64(16))
    with coalition(groups, [0, 2]):
        assert got == score(model, x, y, "neg_loss", batch_size=16)
        assert [l.active for l in groups["blocks.1"]] == [False] * 4
    assert block_subsets(np.int64(6)) == block_subsets(6)
    table = random_game(3, 5)
    for estimator in (shapley_permutation, shapley_multilinear):
        got = estimator(table, np.int64(3), np.int64(8), generator=torch.Generator().manual_seed(0))
        ref = estimator(table, 3, 8, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert torch.equal(shapley_exact(table, np.int64(3)), shapley_exact(table, 3))
