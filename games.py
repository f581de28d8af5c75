"""What trained adapters can do afterwards: Shapley credit, interpolation, combining, pruning.

CoTo's claims (Zhuang et al., ICML 2025, arXiv 2506.05713: its cooperative-game analysis, mode
connectivity, merging and pruning experiments) as plain functions of a model and data. Adapters of
several seeds or tasks are *combined* ("merging" stays lora.merge_lora's folding into W).

    table, _ = coalition_values(model.embed, model.blocks, model.forward_head, x, y, "acc")
    phi = shapley_exact(table, len(model.blocks))  # credit of each block's adapters
    with coalition(block_groups(model), [0, 2]): acc = score(model, x, y)  # blocks 0, 2 adapted
"""
import functools
import math
import numbers
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from coto import block_groups
from lora import lora_layers

DELTA = "delta_weight"  # "<layer>.delta_weight": W_eff - W of one LoRA layer, (out, in)

# ----------------------------------------------------------------------------- Shapley values


def _game(value_fn, n: int, num_samples: int = 2):
    """(v, table): a memoized callable frozenset -> float and the (2^n,) table (None for a callable)."""
    if n < 1 or num_samples < 2:  # one sample has no standard error
        raise ValueError(f"n={n!r} players must be >= 1 and num_samples={num_samples!r} >= 2")
    if callable(value_fn):
        @functools.cache  # the sampled estimators revisit coalitions often
        def v(S: frozenset) -> float:
            value = float(value_fn(S))
            if not math.isfinite(value):  # a NaN would spread into every Shapley value without a word
                raise ValueError(f"value_fn returned {value} for coalition {sorted(S)}: values must be finite")
            return value
        return v, None
    table = torch.as_tensor(value_fn, dtype=torch.float64).cpu()
    bad = torch.nonzero(~torch.isfinite(table)).flatten()[:5].tolist()
    if table.shape != (2 ** n,) or bad:
        raise ValueError(f"a coalition table for n={n} players holds {2 ** n} finite values; got shape "
                         f"{tuple(table.shape)}, non-finite at bitmasks {bad}")
    return (lambda S: float(table[sum(1 << i for i in S)])), table


def shapley_exact(value_fn, n: int) -> torch.Tensor:
    """Exact Shapley values (n,) float64 of a (2^n,) table or a callable frozenset -> float."""
    v, table = _game(value_fn, n)
    if table is None:
        table = torch.tensor([v(frozenset(i for i in range(n) if m >> i & 1)) for m in range(2 ** n)],
                             dtype=torch.float64)
    masks = torch.arange(2 ** n)
    size = sum((masks >> i) & 1 for i in range(n))  # |S| of every coalition, (2^n,)
    # phi_i = sum over S without i of |S|! (n-|S|-1)! / n! * (v(S + i) - v(S)); that weight = 1 / (n C(n-1, |S|))
    weight = torch.tensor([1.0 / (n * math.comb(n - 1, s)) if s < n else 0.0 for s in range(n + 1)],
                          dtype=torch.float64)[size]
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]  # the 2^(n-1) coalitions S not containing i
        phi[i] = (weight[without] * (table[without | (1 << i)] - table[without])).sum()
    return phi


def shapley_permutation(value_fn, n: int, num_samples: int, generator=None):
    """Monte Carlo Shapley (Castro et al., 2009) over random orderings: (phi, stderr), (n,) each."""
    v, _ = _game(value_fn, n, num_samples)
    contrib = torch.zeros(num_samples, n, dtype=torch.float64)  # (samples, players)
    for s in range(num_samples):
        S = frozenset()
        for i in torch.randperm(n, generator=generator).tolist():
            contrib[s, i] = v(S | {i}) - v(S)
            S = S | {i}
    return contrib.mean(0), contrib.std(0) / math.sqrt(num_samples)


def shapley_multilinear(value_fn, n: int, num_samples: int, generator=None, antithetic: bool = True):
    """The paper's multilinear-extension estimator (Owen, 1972; Okhrati & Lipani, 2021): (phi, stderr).
    phi_i = integral over q in [0, 1] of E_{S ~ Bernoulli(q)^n} [v(S + i) - v(S - i)] dq."""
    v, _ = _game(value_fn, n, num_samples)

    def marginals(S: frozenset) -> torch.Tensor:  # v(S + i) - v(S - i) for every i, (n,)
        return torch.tensor([v(S | {i}) - v(S - {i}) for i in range(n)], dtype=torch.float64)

    est = torch.zeros(num_samples, n, dtype=torch.float64)
    for s in range(num_samples):
        q = torch.rand((), generator=generator, dtype=torch.float64)
        inside = torch.rand(n, generator=generator, dtype=torch.float64) < q  # S = {i : u_i < q}, (n,)
        S = frozenset(torch.nonzero(inside).flatten().tolist())
        est[s] = marginals(S)
        if antithetic:  # the mirrored draw (1 - q, 1 - u), i.e. the complement of S: lower variance
            est[s] = (est[s] + marginals(frozenset(range(n)) - S)) / 2
    return est.mean(0), est.std(0) / math.sqrt(num_samples)

# ------------------------------------------------- coalitions of adapters: groups switched by `active`


@contextmanager
def coalition(groups: dict, members):
    """Only the groups in `members` (indices or names of `groups`) have their adapters on, in any mode."""
    names, members = list(groups), set(members)
    unknown = [m for m in members if m not in names and (  # a mask of bools is not a list of members
        isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m < len(names))]
    if unknown:
        raise ValueError(f"coalition members {unknown} are neither indices 0..{len(names) - 1} "
                         f"nor group names ({', '.join(names)})")
    before = {layer: layer.active for layers in groups.values() for layer in layers}
    if any(getattr(layer, "merged", False) for layer in before):  # switching it off would do nothing
        raise ValueError("the model's adapters are merged into W: call lora.unmerge_lora(model) first")
    try:
        for i, (name, layers) in enumerate(groups.items()):
            for layer in layers:
                layer.active = i in members or name in members
        yield
    finally:
        for layer, active in before.items():
            layer.active = active


def _check_eval(modules, x, y, value: str, batch_size: int) -> None:
    if value not in ("acc", "neg_loss"):
        raise ValueError(f"value={value!r}: choose 'acc' (accuracy) or 'neg_loss' (minus cross-entropy)")
    if any(m.training for m in modules.modules()):  # dropout and CoTo's draw would make values random
        raise ValueError("the model is in training mode: call model.eval() first")
    if len(x) != len(y) or len(y) == 0:  # y would broadcast: an "accuracy" above 1
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: give one label (sequence) per example")
    if batch_size < 1:  # a negative one would score no batch at all
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")


def _metric_sum(logits: torch.Tensor, y: torch.Tensor, value: str) -> float:
    """Summed correct predictions or minus cross-entropy; logits (B, C) or (B, T, C), y (B,) or (B, T)."""
    logits, y = logits.flatten(0, -2).float(), y.flatten()
    return ((logits.argmax(-1) == y).sum() if value == "acc" else -F.cross_entropy(logits, y, reduction="sum")).item()


@torch.no_grad()
def score(model, x: torch.Tensor, y: torch.Tensor, value: str = "acc", batch_size: int = 1000) -> float:
    """Accuracy ("acc") or minus the mean cross-entropy ("neg_loss") of model(x) against y, in batches."""
    _check_eval(model, x, y, value, batch_size)
    device = next(model.parameters()).device
    total = sum(_metric_sum(model(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device), value)
                for i in range(0, len(x), batch_size))
    return total / y.numel()


@torch.no_grad()
def coalition_values(embed, blocks, forward_head, x: torch.Tensor, y: torch.Tensor, value: str = "acc",
                     groups: dict | None = None, batch_size: int = 1024):
    """(values, block calls made): a (2^n,) float64 table, table[m] = v({i : bit i of m is set}), of
    the coalitions of adapter groups (default: one per block) of forward_head(blocks[L-1](... embed(x))).

    Prefix sharing: coalitions that agree on the players of blocks 0..l share the activations after
    block l, so a depth-first walk computes each prefix once: per batch, with one player per block,
    2^(L+1) - 2 block calls against L * 2^L (L = 12: 8,190 vs 49,152), at most L activations held."""
    _check_eval(blocks, x, y, value, batch_size)
    groups = block_groups(blocks) if groups is None else groups
    block_of = {id(m): b for b, block in enumerate(blocks) for m in block.modules()}
    per_block = [[] for _ in blocks]  # for each block, the indices of the players inside it
    for p, (name, layers) in enumerate(groups.items()):
        homes = {block_of.get(id(layer)) for layer in layers}
        if None in homes or len(homes) != 1:  # the walk switches a player only inside its block
            raise ValueError(f"player {name!r} has layers outside any block or in several blocks; "
                             f"evaluate its coalitions with `coalition` and `score` instead")
        per_block[homes.pop()].append(p)
    layers = list(groups.values())
    device = next(blocks.parameters()).device
    total = torch.zeros(2 ** len(groups), dtype=torch.float64)  # summed correct counts or losses, per coalition
    block_evals = 0

    def walk(l: int, h: torch.Tensor, mask: int, yb: torch.Tensor) -> None:
        nonlocal block_evals
        if l == len(blocks):
            total[mask] += _metric_sum(forward_head(h), yb, value)
            return
        for sub in range(2 ** len(per_block[l])):  # every on/off choice of this block's players
            bits = 0  # this choice's players in the coalition's bitmask
            for j, p in enumerate(per_block[l]):
                for layer in layers[p]:
                    layer.active = bool(sub >> j & 1)
                bits |= (sub >> j & 1) << p
            block_evals += 1
            walk(l + 1, blocks[l](h), mask | bits, yb)

    with coalition(groups, range(len(groups))):  # refuses merged adapters; restores every flag afterwards
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            walk(0, embed(xb), 0, yb)
    return total / y.numel(), block_evals

# ------------------------------ adapters as state dicts: factors (lora.lora_state_dict) or delta W


@contextmanager
def use_adapter(model, state: dict):
    """Run `model` with another adapter for a while. Keys: a parameter's name (values copied in), or
    "<layer>.delta_weight" (out, in): the layer computes exactly W + delta, for any variant."""
    layers, params = lora_layers(model), dict(model.named_parameters())
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's adapters are merged into W: call lora.unmerge_lora(model) first")
    targets = {}  # key -> the parameter it writes; every key and shape checked before anything changes
    for key, t in state.items():
        name = key.rpartition(".")[0]
        targets[key] = layers[name].base.weight if key.endswith(DELTA) and name in layers else params.get(key)
        if targets[key] is None:
            raise ValueError(f"{key} is not a parameter of this model (nor a LoRA layer's {DELTA}): "
                             f"saved from another model or with other targets?")
        if t.shape != targets[key].shape:
            raise ValueError(f"{key}: shape {tuple(t.shape)} in the state, {tuple(targets[key].shape)} in the "
                             f"model (another r, model size or number of classes?)")
    saved = [(p, p.detach().clone()) for p in targets.values()]
    flags = [(layer, layer.active) for layer in layers.values()]
    try:
        for key, t in state.items():
            if key.endswith(DELTA) and key.rpartition(".")[0] in layers:
                targets[key].data += t.to(targets[key])  # W + delta with the adapter bypassed
                layers[key.rpartition(".")[0]].active = False
            else:
                targets[key].data.copy_(t)  # in place: optimizers and layers hold these objects
        yield model
    finally:
        for p, t in reversed(saved):
            p.data.copy_(t)
        for layer, active in flags:
            layer.active = active


@torch.no_grad()
def delta_state(model, state: dict | None = None) -> dict:
    """{"<layer>.delta_weight": W_eff - W} of the model's adapter or of `state` (other entries kept)."""
    factors, other = split_state(model, state or {})
    with use_adapter(model, {k: v for k, v in factors.items() if not k.endswith(DELTA)}):
        deltas = {f"{name}.{DELTA}": layer.delta_weight().detach().clone()
                  for name, layer in lora_layers(model).items()}
    return {**deltas, **{k: v for k, v in factors.items() if k.endswith(DELTA)}, **other}


def split_state(model, state: dict):
    """(adapter entries, other entries such as a head): by module type, not by name pattern."""
    layers = lora_layers(model)
    adapter = {k: v for k, v in state.items() if k.rpartition(".")[0] in layers}
    return adapter, {k: v for k, v in state.items() if k not in adapter}

# ---------------------------------------------------------------- interpolation and combining


def combine(states: list, weights) -> dict:
    """sum_k weights[k] * states[k], key by key. Fusion (the paper's multi-task combination): factor
    states, weights 1/K; delta-W averaging: delta states, 1/K; task arithmetic: delta states, lambda each."""
    weights = [float(w) for w in weights]
    if len(states) != len(weights) or not states or not all(map(math.isfinite, weights)):
        raise ValueError(f"{len(states)} states and weights {weights}: give one finite weight per state")
    for k, s in enumerate(states[1:], 1):
        if set(s) != set(states[0]):  # a key missing from one state would be dropped silently
            raise ValueError(f"state {k} has other keys than state 0 (e.g. {sorted(set(s) ^ set(states[0]))[:3]})")
        differ = [key for key in s if s[key].shape != states[0][key].shape]  # no broadcasting
        if differ:
            raise ValueError(f"state {k} and state 0 differ in the shape of {differ[:3]}: another r or "
                             f"model size; heads of different tasks are not combined")
    return {key: sum(w * s[key].to(states[0][key].device) for w, s in zip(weights, states)) for key in states[0]}


def interpolate(a: dict, b: dict, lam: float) -> dict:
    """(1 - lam) a + lam b on every tensor: the factors A and B (the paper's "linear fusion") or delta W."""
    return combine([a, b], [1.0 - lam, lam])


def interpolate_delta(model, a: dict, b: dict, lam: float) -> dict:
    """(1 - lam) dW_a + lam dW_b: for LoRA, factors' plus lam (1 - lam) (B_a - B_b)(A_a - A_b)."""
    return interpolate(delta_state(model, a), delta_state(model, b), lam)


def barrier(lambdas, values) -> tuple:
    """(largest drop below the line between the endpoints (0 if none), value at lambda 0.5)."""
    lambdas, values = [float(l) for l in lambdas], [float(v) for v in values]
    if (len(lambdas) < 3 or lambdas[0] != 0.0 or lambdas[-1] != 1.0 or 0.5 not in lambdas
            or any(b <= a for a, b in zip(lambdas, lambdas[1:]))):
        raise ValueError(f"lambdas {lambdas} must increase from 0 to 1 and contain 0.5, e.g. (0, 0.25, 0.5, 0.75, 1)")
    if len(values) != len(lambdas):
        raise ValueError(f"{len(lambdas)} lambdas but {len(values)} values: give one value per lambda")
    if not all(map(math.isfinite, values)):  # max() would skip a NaN: barrier 0
        raise ValueError(f"values {values} must be finite (check the evaluation that produced them)")
    line = [(1 - l) * values[0] + l * values[-1] for l in lambdas]
    return max(0.0, max(ln - v for ln, v in zip(line, values))), values[lambdas.index(0.5)]


def _smallest(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest |t| entries (ties broken by position), same shape as t."""
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    mask[t.abs().flatten().argsort(stable=True)[:k]] = True
    return mask.view_as(t)


def _no_factors(deltas: dict, what: str) -> None:
    factors = [k for k in deltas if k.rpartition(".")[2] in ("lora_A", "lora_B", "lora_magnitude")]
    if factors:  # magnitudes of A and B mean nothing alone
        raise ValueError(f"{what} works on delta W, but the state holds factors ({factors[0]}, ...): "
                         f"pass delta_state(model, state) instead")


def combine_ties(deltas: list, density: float = 0.2, lam: float = 1.0) -> dict:
    """TIES-merging (Yadav et al., NeurIPS 2023) of the tasks' delta W, tensor by tensor."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]: the fraction of entries each task keeps")
    for d in deltas:
        _no_factors(d, "combine_ties")
    combine(deltas, [lam] * len(deltas))  # checks that keys and shapes agree
    out = {}
    for key in deltas[0]:
        t = torch.stack([d[key] for d in deltas])  # (tasks, ...)
        # trim each to its round(density * numel) largest magnitudes, elect the sign of their sum,
        # average only the kept values that agree with it
        trimmed = torch.stack([x.masked_fill(_smallest(x, x.numel() - round(density * x.numel())), 0.0) for x in t])
        agree = (trimmed.sign() == trimmed.sum(0).sign()) & (trimmed != 0)  # (tasks, ...)
        out[key] = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out

# ------------------------------------------------------------------------------------ pruning


def block_subsets(n: int) -> dict:
    """Structured pruning as the blocks that KEEP adapters: every other one, or a (non-empty) third."""
    if n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (the number of blocks)")
    thirds = {name: list(range(i * n // 3, (i + 1) * n // 3)) for i, name in enumerate(("low", "middle", "high"))}
    return {"every_other": list(range(0, n, 2)), **{name: keep for name, keep in thirds.items() if keep}}


def _prune(state: dict, sparsity: float, leaves: tuple, hint: str) -> dict:
    """The tensors whose key ends in one of `leaves` pruned by magnitude, the others kept as they are."""
    prunable = {k for k in state if k.rpartition(".")[2] in leaves}
    if not prunable:  # pruning nothing would look like robustness
        raise ValueError(f"no {' / '.join(leaves)} key in the state ({', '.join(list(state)[:3])}...): {hint}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    return {k: t.masked_fill(_smallest(t, round(sparsity * t.numel())), 0.0) if k in prunable else t
            for k, t in state.items()}


def prune_magnitude(deltas: dict, sparsity: float) -> dict:
    """Unstructured pruning: the round(sparsity * numel) smallest |entries| of each delta W zeroed."""
    _no_factors(deltas, "prune_magnitude")
    return _prune(deltas, sparsity, (DELTA,), "nothing to prune; pass delta_state(model, state)")


def prune_factors(state: dict, sparsity: float) -> dict:
    """The same on lora_A and lora_B (a likelier reading of the paper's "adapter weights"; B A is denser)."""
    return _prune(state, sparsity, ("lora_A", "lora_B"), "prune_factors takes a factor state "
                  "(lora.lora_state_dict); prune delta W with prune_magnitude")
