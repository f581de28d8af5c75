"""What trained adapters can do afterwards: Shapley credit, mode connectivity, merging, pruning.

CoTo (Zhuang et al., ICML 2025, arXiv 2506.05713) claims that its adapters share credit more evenly
across blocks, interpolate between seeds without a barrier, merge better across tasks and survive
pruning (method.md section 4). This file holds the measurements, as functions that take their
inputs as arguments (any game; any model with `embed` / `blocks` / `forward_head`):

    Shapley        shapley_exact(value_fn, n)                 all 2^n coalitions, n <= ~12
                   shapley_permutation(value_fn, n, num_samples, generator)  -> (phi, stderr)
                   shapley_multilinear(value_fn, n, num_samples, generator)  -> (phi, stderr)
                   coalition_values(embed, blocks, forward_head, x, y)  every coalition of the
                   blocks' adapters, shared prefixes computed once: the table shapley_exact takes
    coalitions     with coalition(groups, members): ...       only those adapter groups on
    adapters       with use_adapter(model, state): ...        a saved adapter (factors or delta W)
                   delta_state(model, state)                  {"<layer>.delta_weight": W_eff - W}
    connectivity   interpolate(a, b, lam), interpolate_delta(model, a, b, lam), connectivity(...)
    merging        combine(states, weights) (fusion, averaging, task arithmetic), ties_merge(deltas)
    pruning        block_subsets(n) + coalition (structured), keep_qkv(deltas, part),
                   prune_magnitude(deltas, sparsity) (unstructured)
    reports        adapter_report, pair_report, merge_report: all of the above on held-out data

A value function maps a frozenset of player indices to a float. A coalition table is a float64
tensor of 2^n values indexed by bitmask: table[m] = v({i : bit i of m is set}).

    table, _ = coalition_values(model.embed, model.blocks, model.forward_head, x, y, "acc")
    phi = shapley_exact(table, len(model.blocks))     # credit of each block's adapters

Run as a script on adapters that train_vit.py saved (Config at the end of the file):
    python games.py --run-dir runs/vit            # writes runs/vit/games/games.json and PNG plots
"""
import dataclasses
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coto import active_mask, block_groups
from lora import LoRALinear, lora_layers
from utils import atomic_write_text, format_eta, parse_config, pick_device, read_safetensors

# ---------------------------------------------------------------------------------------------
# Shapley values of any cooperative game


def _as_value_fn(value_fn, n: int):
    """A callable frozenset -> float from a callable or a (2^n,) coalition table."""
    if callable(value_fn):
        return value_fn
    table = torch.as_tensor(value_fn, dtype=torch.float64)
    if table.shape != (2 ** n,):
        raise ValueError(f"a coalition table for n={n} players has shape ({2 ** n},), "
                         f"got {tuple(table.shape)}")
    return lambda S: float(table[sum(1 << i for i in S)])


def _memoized(value_fn):
    """Each coalition is evaluated once (the sampled estimators revisit coalitions often)."""
    cache = {}

    def v(S: frozenset) -> float:
        if S not in cache:
            cache[S] = float(value_fn(S))
        return cache[S]
    return v


def shapley_exact(value_fn, n: int) -> torch.Tensor:
    """Exact Shapley values (n,) float64 from all 2^n coalitions:

        phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S))

    `value_fn` is a callable frozenset -> float or a (2^n,) table (see coalition_values)."""
    if not 1 <= n <= 20:
        raise ValueError(f"exact Shapley needs 2^n coalition values; n={n} must be in 1..20 "
                         f"(use shapley_permutation or shapley_multilinear for more players)")
    if callable(value_fn):
        table = torch.tensor([float(value_fn(frozenset(i for i in range(n) if m >> i & 1)))
                              for m in range(2 ** n)], dtype=torch.float64)
    else:
        table = torch.as_tensor(value_fn, dtype=torch.float64)
        _as_value_fn(table, n)  # validates the shape
    masks = torch.arange(2 ** n)
    size = sum((masks >> i) & 1 for i in range(n))  # |S| of every coalition, (2^n,)
    # weight of a coalition of size s without i: s! (n-s-1)! / n! = 1 / (n * C(n-1, s))
    weight = torch.tensor([1.0 / (n * math.comb(n - 1, s)) if s < n else 0.0 for s in range(n + 1)],
                          dtype=torch.float64)[size]
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]  # the 2^(n-1) coalitions S not containing i
        phi[i] = (weight[without] * (table[without | (1 << i)] - table[without])).sum()
    return phi


def shapley_permutation(value_fn, n: int, num_samples: int, generator=None):
    """Monte Carlo Shapley: the average marginal contribution of each player over `num_samples`
    random orderings (Castro et al., 2009). Returns (phi, stderr), both (n,) float64; stderr is
    the sample standard deviation over orderings / sqrt(num_samples). Cost: at most
    num_samples * (n + 1) evaluations (coalitions are memoized)."""
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples}: need at least 2 orderings for a standard error")
    v = _memoized(_as_value_fn(value_fn, n))
    contrib = torch.zeros(num_samples, n, dtype=torch.float64)  # (samples, players)
    for s in range(num_samples):
        S, before = frozenset(), v(frozenset())
        for i in torch.randperm(n, generator=generator).tolist():
            S = S | {i}
            after = v(S)
            contrib[s, i], before = after - before, after
    return contrib.mean(0), contrib.std(0) / math.sqrt(num_samples)


def shapley_multilinear(value_fn, n: int, num_samples: int, generator=None, antithetic: bool = True):
    """The multilinear-extension estimator the paper uses (Owen, 1972; Okhrati & Lipani, 2021):

        phi_i = integral over q in [0, 1] of E_{S ~ Bernoulli(q)^n} [v(S + i) - v(S - i)] dq

    Each sample draws q ~ U(0, 1) and u ~ U(0, 1)^n, S = {i : u_i < q}, and scores every player
    on that one S. With `antithetic` the mirrored draw (1 - q, 1 - u), i.e. the complement of S,
    is averaged in (unbiased, usually lower variance). Returns (phi, stderr), (n,) float64; stderr
    is the standard deviation over samples / sqrt(num_samples). Cost: at most
    num_samples * (n + 1) evaluations, twice that with antithetic (memoized)."""
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples}: need at least 2 samples for a standard error")
    v = _memoized(_as_value_fn(value_fn, n))

    def marginals(S: frozenset) -> torch.Tensor:  # v(S + i) - v(S - i) for every i, (n,)
        return torch.tensor([v(S | {i}) - v(S - {i}) for i in range(n)], dtype=torch.float64)

    est = torch.zeros(num_samples, n, dtype=torch.float64)
    for s in range(num_samples):
        q = torch.rand((), generator=generator, dtype=torch.float64)
        inside = torch.rand(n, generator=generator, dtype=torch.float64) < q  # (n,) bool
        S = frozenset(torch.nonzero(inside).flatten().tolist())
        est[s] = marginals(S)
        if antithetic:
            est[s] = (est[s] + marginals(frozenset(range(n)) - S)) / 2
    return est.mean(0), est.std(0) / math.sqrt(num_samples)


# ---------------------------------------------------------------------------------------------
# Coalitions of adapters


def coalition(groups: dict, members):
    """Context manager: only the adapter groups in `members` (indices or names of `groups`, e.g.
    coto.block_groups(model)) are on; every layer's previous `active` flag comes back after.

        with coalition(block_groups(model), {0, 2}):
            acc = evaluate(model)
    """
    names = list(groups)
    members = set(members)
    unknown = [m for m in members if m not in names and not (isinstance(m, int) and 0 <= m < len(names))]
    if unknown:
        raise ValueError(f"coalition members {unknown} are neither indices 0..{len(names) - 1} nor "
                         f"group names ({', '.join(names)})")
    return active_mask(groups, [i in members or name in members for i, name in enumerate(names)])


def _block_players(blocks, groups) -> list:
    """For each block, the indices of the players (groups) whose layers all sit inside it."""
    block_of = {id(m): b for b, block in enumerate(blocks) for m in block.modules()}
    per_block = [[] for _ in blocks]
    for p, (name, layers) in enumerate(groups.items()):
        homes = {block_of.get(id(layer)) for layer in layers}
        if None in homes or len(homes) != 1:
            raise ValueError(f"player {name!r} has layers outside any block or in several blocks "
                             f"({sorted(h for h in homes if h is not None)}); prefix sharing needs each "
                             f"player inside one block (evaluate coalitions with `coalition` instead)")
        per_block[homes.pop()].append(p)
    return per_block


def _metric_sum(logits: torch.Tensor, y: torch.Tensor, value: str) -> float:
    """Summed correct predictions ("acc") or summed minus cross-entropy ("neg_loss"); logits
    (B, C) or (B, T, C), y (B,) or (B, T)."""
    logits, y = logits.flatten(0, -2).float(), y.flatten()
    if value == "acc":
        return (logits.argmax(-1) == y).sum().item()
    return -F.cross_entropy(logits, y, reduction="sum").item()


@torch.no_grad()
def score(model, x: torch.Tensor, y: torch.Tensor, value: str = "acc", batch_size: int = 1000) -> float:
    """Accuracy or minus the mean cross-entropy of model(x) against y, in batches."""
    total = sum(_metric_sum(model(x[i:i + batch_size]), y[i:i + batch_size], value)
                for i in range(0, len(x), batch_size))
    return total / y.numel()


@torch.no_grad()
def coalition_values(embed, blocks, forward_head, x: torch.Tensor, y: torch.Tensor, value: str = "acc",
                     groups: dict | None = None, batch_size: int = 1024):
    """The value of every coalition of adapter groups, for a layered model
    `logits = forward_head(blocks[L-1](... blocks[0](embed(x))))`.

    Players are `groups` ({name: [LoRALinear]}, in order; default one player per block holding
    that block's adapters; per-module players: `block_groups(model, group_of=lambda n: n)`), each
    inside one block. value: "acc" (accuracy) or "neg_loss" (minus the mean cross-entropy), over
    all of x (B, ...) / y (B,) or (B, T) with logits (B, C) or (B, T, C).

    Prefix sharing: coalitions that agree on the players of blocks 0..l share the activations after
    block l, so a depth-first walk computes each distinct prefix once. Per batch that is
    sum over l of 2^(players in blocks 0..l) block evaluations; with one player per block,
    2^(L+1) - 2 against L * 2^L for n full forward passes per coalition (L = 6: 126 vs 384;
    L = 12: 8,190 vs 49,152), and at most L activations held at once.

    Returns (values, block_evals): values is (2^n,) float64 indexed by bitmask (bit i = player i),
    ready for shapley_exact(values, n); block_evals counts block calls over all batches."""
    if value not in ("acc", "neg_loss"):
        raise ValueError(f"value={value!r}: choose 'acc' (accuracy) or 'neg_loss' (minus cross-entropy)")
    if any(m.training for m in blocks.modules()):
        raise ValueError("blocks are in training mode (dropout would make coalition values random): "
                         "call model.eval() first")
    if groups is None:
        groups = {str(b): [m for m in block.modules() if isinstance(m, LoRALinear)]
                  for b, block in enumerate(blocks)}
        groups = {name: layers for name, layers in groups.items() if layers}
    n = len(groups)
    if not 1 <= n <= 20:
        raise ValueError(f"{n} players: coalition_values enumerates 2^n coalitions, n must be in 1..20")
    per_block = _block_players(blocks, groups)
    layers = list(groups.values())
    total = torch.zeros(2 ** n, dtype=torch.float64)  # summed correct counts or losses, per coalition
    count, block_evals = 0, 0

    def walk(l: int, h: torch.Tensor, mask: int, yb: torch.Tensor) -> None:
        nonlocal block_evals
        if l == len(blocks):
            total[mask] += _metric_sum(forward_head(h), yb, value)
            return
        players = per_block[l]
        for sub in range(2 ** len(players)):  # every on/off choice for this block's players
            bits = 0
            for j, p in enumerate(players):
                on = bool(sub >> j & 1)
                for layer in layers[p]:
                    layer.active = on
                bits |= on << p
            block_evals += 1
            walk(l + 1, blocks[l](h), mask | bits, yb)

    with coalition(groups, range(n)):  # restores every layer's flag afterwards
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            walk(0, embed(xb), 0, yb)
            count += yb.numel()
    return total / count, block_evals


# ---------------------------------------------------------------------------------------------
# Adapters as state dicts: factors ("blocks.0.attn.qkv.lora_A", from lora.lora_state_dict) or
# delta W ("blocks.0.attn.qkv.delta_weight"), plus any other parameter such as the task's head.

DELTA = "delta_weight"


@contextmanager
def use_adapter(model, state: dict):
    """Temporarily load `state` into `model`; everything it touched comes back afterwards.

    Parameter keys (lora_A, lora_B, lora_magnitude, head.weight, ...) replace the parameter's
    tensor (a head may have another number of classes). A "<layer>.delta_weight" key (out, in)
    makes that LoRALinear compute exactly W + delta: its frozen base weight is swapped for
    W + delta and the adapter is bypassed (active = False). That is how averaged, TIES-merged and
    pruned delta-W adapters are evaluated for any variant (DoRA and HiRA included) without
    re-factorising them into a rank-r A and B. Switching adapters on inside (coalition, CoTo)
    would add the factors on top: do not."""
    params = dict(model.named_parameters())
    layers = lora_layers(model)
    saved = []  # (parameter, old tensor) and (layer, old active flag)
    try:
        for key, t in state.items():
            name, _, leaf = key.rpartition(".")
            if leaf == DELTA and name in layers:
                layer = layers[name]
                if layer.merged or t.shape != layer.base.weight.shape:
                    raise ValueError(f"{key}: cannot apply a delta of shape {tuple(t.shape)} to layer "
                                     f"{name} (weight {tuple(layer.base.weight.shape)}, merged="
                                     f"{layer.merged}); unmerge the model or check the state's origin")
                saved.append((layer, layer.active))
                layer.active = False
                key, t = f"{name}.base.weight", layer.base.weight + t.to(layer.base.weight)
            elif name in layers and layers[name].merged:
                raise ValueError(f"{key}: layer {name} is merged; call lora.unmerge_lora(model) first")
            if key not in params:
                raise ValueError(f"{key} is not a parameter of this model (nor a LoRA layer's "
                                 f"{DELTA}); was the state saved from another model or targets?")
            p = params[key]
            saved.append((p, p.data))
            p.data = t.detach().to(device=p.device, dtype=p.dtype)
        yield model
    finally:
        for obj, old in reversed(saved):
            if isinstance(obj, LoRALinear):
                obj.active = old
            else:
                obj.data = old


@torch.no_grad()
def delta_state(model, state: dict | None = None) -> dict:
    """{"<layer>.delta_weight": W_eff - W (out, in)} for every LoRA layer, of the model's current
    adapter or of `state` (loaded temporarily); entries of `state` that are not adapter keys (a
    head) are passed through unchanged, so the result can be given to use_adapter as it is."""
    with use_adapter(model, state or {}):
        deltas = {f"{name}.{DELTA}": layer.delta_weight().detach().clone()
                  for name, layer in lora_layers(model).items()}
    return {**deltas, **split_state(model, state or {})[1]}


def split_state(model, state: dict):
    """(adapter entries, other entries such as a head): a key is an adapter entry when the module
    it belongs to is one of the model's LoRA layers (by module type, not by name pattern)."""
    layers = lora_layers(model)
    adapter = {k: v for k, v in state.items() if k.rpartition(".")[0] in layers}
    return adapter, {k: v for k, v in state.items() if k not in adapter}


# ---------------------------------------------------------------------------------------------
# Mode connectivity and merging


def combine(states: list, weights) -> dict:
    """sum_k weights[k] * states[k], key by key. Factor averaging ("fusion", the paper's merge):
    factor states with weights 1/K; delta-W averaging: delta states with 1/K; task arithmetic:
    delta states with a weight lambda each; interpolation: [a, b] with [1 - lam, lam]."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} states and {len(weights)} weights: give one weight per state")
    keys = set(states[0])
    for k, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"state {k} has other keys than state 0 (e.g. "
                             f"{sorted(set(s) ^ keys)[:3]}): merge states of the same model and targets")
    return {key: sum(w * s[key] for w, s in zip(weights, states)) for key in states[0]}


def interpolate(a: dict, b: dict, lam: float) -> dict:
    """theta(lam) = (1 - lam) a + lam b on every tensor: on the A and B factors for factor states
    (the paper's "linear fusion"), or on delta W for delta states (see interpolate_delta)."""
    return combine([a, b], [1.0 - lam, lam])


def interpolate_delta(model, a: dict, b: dict, lam: float) -> dict:
    """Interpolate delta W = W_eff - W instead of the factors: (1 - lam) dW_a + lam dW_b. For plain
    LoRA this differs from interpolating A and B by the cross terms lam (1 - lam) (B_a - B_b)(A_a - A_b)."""
    return interpolate(delta_state(model, a), delta_state(model, b), lam)


def barrier(lambdas, values) -> tuple:
    """(barrier, midpoint) of an interpolation curve: the largest drop of values[k] below the
    straight line between the two endpoints (0 when the curve never dips below it), and the value
    at lambda = 0.5. lambdas must start at 0, end at 1 and contain 0.5."""
    lambdas, values = [float(l) for l in lambdas], [float(v) for v in values]
    if lambdas[0] != 0.0 or lambdas[-1] != 1.0 or 0.5 not in lambdas:
        raise ValueError(f"lambdas {lambdas} must start at 0, end at 1 and contain 0.5")
    line = [(1 - l) * values[0] + l * values[-1] for l in lambdas]
    return max(0.0, max(ln - v for ln, v in zip(line, values))), values[lambdas.index(0.5)]


def connectivity(model, evaluate, a: dict, b: dict, lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
                 space: str = "factors") -> dict:
    """Evaluate the path between two adapters of one task: `evaluate(model) -> float` at each
    lambda, interpolating the factors (space="factors") or delta W (space="delta").
    Returns {"lambdas", "values", "barrier", "midpoint", "space"}."""
    if space not in ("factors", "delta"):
        raise ValueError(f"space={space!r}: choose 'factors' (A and B) or 'delta' (delta W)")
    if space == "delta":
        a, b = delta_state(model, a), delta_state(model, b)
    values = []
    for lam in lambdas:
        with use_adapter(model, interpolate(a, b, lam)):
            values.append(float(evaluate(model)))
    gap, mid = barrier(lambdas, values)
    return {"lambdas": list(lambdas), "values": values, "barrier": gap, "midpoint": mid, "space": space}


def _smallest(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest |t| entries (ties broken by position), same shape as t."""
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    mask[t.abs().flatten().argsort(stable=True)[:k]] = True
    return mask.view_as(t)


def ties_merge(deltas: list, density: float = 0.2, lam: float = 1.0) -> dict:
    """TIES-merging (Yadav et al., NeurIPS 2023) of task vectors, here each task's delta W, tensor
    by tensor: (1) trim: keep the round(density * numel) largest magnitudes of each task's tensor;
    (2) elect: the sign of the sum of the trimmed tensors, per entry; (3) disjoint mean: average,
    per entry, only the trimmed values that are non-zero and agree with the elected sign;
    then scale by lam."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]: the fraction of entries each task keeps")
    combine(deltas, [1.0] * len(deltas))  # validates that the keys agree
    merged = {}
    for key in deltas[0]:
        t = torch.stack([d[key] for d in deltas])  # (tasks, ...)
        n = t[0].numel()
        trimmed = torch.stack([x.masked_fill(_smallest(x, n - round(density * n)), 0.0) for x in t])
        sign = trimmed.sum(0).sign()
        agree = (trimmed.sign() == sign) & (trimmed != 0)
        merged[key] = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged


# ---------------------------------------------------------------------------------------------
# Pruning


def block_subsets(n: int) -> dict:
    """The structured pruning patterns over n blocks, as the blocks that KEEP their adapters:
    every other block (drop blocks 1, 3, 5, ...), or only the low, middle or high third.
    Evaluate one with `with coalition(groups, keep): evaluate(model)` (exact for any variant)."""
    thirds = [range(i * n // 3, (i + 1) * n // 3) for i in range(3)]
    return {"every_other": list(range(0, n, 2)), "low": list(thirds[0]),
            "middle": list(thirds[1]), "high": list(thirds[2])}


def keep_qkv(deltas: dict, part: str, fused: str = "qkv") -> dict:
    """Keep only the q, k or v rows of each fused qkv delta (timm's layout: rows [q; k; v], each
    of out/3) and zero every other adapter's delta, so only that projection is adapted."""
    if part not in ("q", "k", "v"):
        raise ValueError(f"part={part!r}: choose 'q', 'k' or 'v'")
    out, hits = {}, 0
    for key, d in deltas.items():
        layer = key.rpartition(".")[0]
        keep = torch.zeros_like(d)
        if key.endswith(DELTA) and layer.rpartition(".")[2] == fused:
            rows = d.shape[0] // 3
            i = "qkv".index(part)
            keep[i * rows:(i + 1) * rows] = d[i * rows:(i + 1) * rows]
            hits += 1
        out[key] = keep if key.endswith(DELTA) else d
    if not hits:
        raise ValueError(f"no '{fused}' delta_weight in the state: q/k/v pruning needs a fused "
                         f"{fused} target (pass delta_state(model, adapter))")
    return out


def prune_magnitude(deltas: dict, sparsity: float) -> dict:
    """Unstructured pruning: zero the round(sparsity * numel) smallest-magnitude entries of each
    delta W (ties broken by position); other entries (a head) are kept."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    return {k: d.masked_fill(_smallest(d, round(sparsity * d.numel())), 0.0) if k.endswith(DELTA) else d
            for k, d in deltas.items()}


# ---------------------------------------------------------------------------------------------
# Reports: every analysis above for one adapter, a pair of seeds, or a set of tasks. The model
# exposes embed / blocks / forward_head; x, y are a held-out set (float inputs, labels).


@torch.no_grad()
def adapter_report(model, x, y, value: str = "acc", sparsities=(0.3, 0.5, 0.7), batch_size: int = 1000) -> dict:
    """Shapley values of the blocks' adapters (exact, prefix-shared), structured pruning (block
    subsets: read off the same coalition table), q/k/v-only and unstructured delta-W pruning of the
    adapter the model holds (in eval mode). The "share" of a block is
    phi_i / sum(phi) = phi_i / (v(all) - v(none))."""
    table, evals = coalition_values(model.embed, model.blocks, model.forward_head, x, y, value,
                                    batch_size=batch_size)
    n = len(model.blocks)
    if len(table) != 2 ** n:
        raise ValueError("adapter_report needs adapters in every block (one player per block)")
    phi = shapley_exact(table, n)
    share = phi / phi.sum()
    deltas = delta_state(model)
    report = {
        "full": table[-1].item(), "none": table[0].item(), "shapley": phi.tolist(),
        "share": share.tolist(), "top_third_share": share[block_subsets(n)["high"]].sum().item(),
        "block_evals": evals, "naive_block_evals": n * 2 ** n * math.ceil(len(x) / batch_size),
        "structured": {name: table[sum(1 << b for b in keep)].item()
                       for name, keep in block_subsets(n).items()},
        "unstructured": {},
    }
    for sparsity in sparsities:
        with use_adapter(model, prune_magnitude(deltas, sparsity)):
            report["unstructured"][str(sparsity)] = score(model, x, y, value, batch_size)
    if any(k.endswith(f"qkv.{DELTA}") for k in deltas):
        report["qkv"] = {}
        for part in "qkv":
            with use_adapter(model, keep_qkv(deltas, part)):
                report["qkv"][part] = score(model, x, y, value, batch_size)
    return report


@torch.no_grad()
def pair_report(model, a: dict, b: dict, x, y, value: str = "acc",
                lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), batch_size: int = 1000) -> dict:
    """Mode connectivity between two adapters (factor states, heads included) of one task:
    {"factors": curve, "delta": curve}, each with its barrier and midpoint (see connectivity)."""
    evaluate = lambda m: score(m, x, y, value, batch_size)  # noqa: E731
    return {space: connectivity(model, evaluate, a, b, lambdas, space) for space in ("factors", "delta")}


@torch.no_grad()
def merge_report(model, states: dict, eval_sets: dict, value: str = "acc", density: float = 0.2,
                 batch_size: int = 1000) -> dict:
    """Merge the adapters of several tasks ({task: factor state with its head}) and evaluate every
    task with its own head ({task: (x, y)}): "single" (each task's own adapter), "fusion" (factor
    average), "delta_avg" (delta-W average) and "ties" (TIES on delta W, this density)."""
    tasks = list(states)
    parts = {t: split_state(model, states[t]) for t in tasks}  # (adapter, head)
    deltas = [split_state(model, delta_state(model, states[t]))[0] for t in tasks]
    merged = {"single": None,
              "fusion": combine([parts[t][0] for t in tasks], [1 / len(tasks)] * len(tasks)),
              "delta_avg": combine(deltas, [1 / len(tasks)] * len(tasks)),
              "ties": ties_merge(deltas, density)}
    report = {}
    for name, adapter in merged.items():
        report[name] = {}
        for t in tasks:
            with use_adapter(model, {**(adapter or parts[t][0]), **parts[t][1]}):
                report[name][t] = score(model, *eval_sets[t], value, batch_size)
    return report


def plot_reports(reports: dict, out_dir, ylabel: str = "accuracy") -> list:
    """PNG plots of {method: {"adapters": [adapter_report], "pairs": [pair_report],
    "merges": [merge_report]}} (methods side by side, means over the lists): shapley.png,
    interpolation.png, merging.png, pruning.png in out_dir. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in reports if any(reports[m].values())]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    written = []

    def bars(ax, labels, values):  # values: {method: [one number per label]}
        width = 0.8 / len(values)
        for k, (m, vs) in enumerate(values.items()):
            ax.bar([i + k * width for i in range(len(labels))], vs, width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
        ax.legend()

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    adapters = {m: reports[m]["adapters"] for m in methods if reports[m].get("adapters")}
    if adapters:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        n = len(next(iter(adapters.values()))[0]["share"])
        bars(ax, [f"block {i}" for i in range(n)], {m: [mean([r["share"][i] for r in rs]) for i in range(n)]
                                                   for m, rs in adapters.items()})
        ax.set_ylabel("Shapley share"), ax.set_title("credit per block (exact Shapley)")
        save(fig, "shapley.png")
        names = ["full", *next(iter(adapters.values()))[0]["structured"],
                 *(f"only {p}" for p in next(iter(adapters.values()))[0].get("qkv", {})),
                 *(f"{float(s):.0%} sparse" for s in next(iter(adapters.values()))[0]["unstructured"])]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bars(ax, names, {m: [mean([r["full"] for r in rs]),
                             *(mean([r["structured"][k] for r in rs]) for k in rs[0]["structured"]),
                             *(mean([r["qkv"][k] for r in rs]) for k in rs[0].get("qkv", {})),
                             *(mean([r["unstructured"][k] for r in rs]) for k in rs[0]["unstructured"])]
                         for m, rs in adapters.items()})
        ax.set_ylabel(ylabel), ax.set_title("pruning the adapters")
        save(fig, "pruning.png")
    pairs = {m: reports[m]["pairs"] for m in methods if reports[m].get("pairs")}
    if pairs:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
        for ax, space in zip(axes, ("factors", "delta")):
            for m, rs in pairs.items():
                lam = rs[0][space]["lambdas"]
                ax.plot(lam, [mean([r[space]["values"][i] for r in rs]) for i in range(len(lam))], "o-", label=m)
            ax.set_xlabel("lambda"), ax.set_title(f"interpolating {space}"), ax.legend()
        axes[0].set_ylabel(ylabel)
        save(fig, "interpolation.png")
    merges = {m: reports[m]["merges"] for m in methods if reports[m].get("merges")}
    if merges:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        kinds = list(next(iter(merges.values()))[0])
        bars(ax, kinds, {m: [mean([mean(list(r[k].values())) for r in rs]) for k in kinds]
                         for m, rs in merges.items()})
        ax.set_ylabel(f"{ylabel}, mean over tasks"), ax.set_title("merging the tasks' adapters")
        save(fig, "merging.png")
    return written


# ---------------------------------------------------------------------------------------------
# Script: the reports on adapters that train_vit.py saved


@dataclass
class Config:
    run_dir: str = "runs/vit"  # searched for <group>/<task>/<method>/seed<k>/adapters.safetensors
    methods: str = "lora,coto"  # method folders to compare side by side
    value: str = "acc"  # acc (accuracy) | neg_loss (minus the cross-entropy)
    n_eval: int = 1000  # held-out test images per task
    players: str = "block"  # block: exact Shapley per block | module: also per module (sampled, multilinear)
    num_samples: int = 16  # multilinear samples for per-module players (each costs 2 (n + 1) evaluations)
    out: str = ""  # where games.json and the plots go ("" = run_dir/games)


def main(cfg: Config) -> dict:
    import train_vit  # the ViT's data and saved-run layout; the functions above need none of it

    if cfg.value not in ("acc", "neg_loss") or cfg.players not in ("block", "module"):
        raise ValueError(f"value={cfg.value!r} must be acc or neg_loss; players={cfg.players!r} block or module")
    root = Path(cfg.run_dir)
    methods = cfg.methods.split(",")
    found = [p for p in sorted(root.rglob("seed*/adapters.safetensors")) if p.parent.parent.name in methods]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(methods)} adapters under {root}/<backbone>/<task>/<method>/seed<k>/: "
                                f"run `python train_vit.py --out-dir {root}` first (or pass --run-dir)")
    if len({p.parents[3] for p in found}) > 1:
        raise ValueError(f"adapters of several backbones under {root} ({sorted({p.parents[3].name for p in found})}): "
                         f"point --run-dir at a folder with one (train_vit.py --out-dir)")
    runs = {}  # (method, task, seed) -> (train_vit.Config, path)
    for p in found:
        vcfg = train_vit.Config(**json.loads((p.parent / "result.json").read_text())["config"])
        runs[p.parent.parent.name, p.parents[2].name, int(p.parent.name[4:])] = (vcfg, p)
    first = next(iter(runs.values()))[0]
    data = train_vit.load_data(first)
    backbone = train_vit.pretrain(first, data)  # the cached backbone of those runs
    task_names = sorted({t for _, t, _ in runs})
    tasks = train_vit.make_tasks(data, task_names, train_vit.parse_classes(first.source_classes), first.patch_size,
                                 first.n_train, first.n_test, first.n_per_class, seed=0)
    device = pick_device(first.device)
    evals = {t: (train_vit.to_float(tasks[t].x_test[:cfg.n_eval]).to(device), tasks[t].y_test[:cfg.n_eval].to(device))
             for t in task_names}

    def model(m, t, s):  # the saved run, rebuilt (eval mode)
        return train_vit.load_adapters(runs[m, t, s][0], tasks[t], backbone, runs[m, t, s][1])
    results, t0 = {}, time.time()
    for m in methods:
        keys = sorted(k for k in runs if k[0] == m)
        res = results[m] = {"adapters": [], "pairs": [], "merges": [], "modules": []}
        for _, t, s in keys:
            net = model(m, t, s)
            rep = adapter_report(net, *evals[t], cfg.value)
            res["adapters"].append({"task": t, "seed": s, **rep})
            print(f"{m} {t} seed {s} | {cfg.value} {rep['full']:.4f} | top-third share {rep['top_third_share']:.2f} | "
                  f"every other {rep['structured']['every_other']:.4f} | {format_eta(time.time() - t0)}", flush=True)
            if cfg.players == "module":
                groups = block_groups(net, group_of=lambda name: name)

                def value_fn(S, net=net, groups=groups, ev=evals[t]):
                    with coalition(groups, S):
                        return score(net, *ev, cfg.value)
                phi, se = shapley_multilinear(value_fn, len(groups), cfg.num_samples,
                                              generator=torch.Generator().manual_seed(s))
                res["modules"].append({"task": t, "seed": s, "names": list(groups), "shapley": phi.tolist(),
                                       "stderr": se.tolist()})
        seeds = sorted({s for _, _, s in keys})
        for t in sorted({t for _, t, _ in keys}):
            for a, b in zip(seeds, seeds[1:]):
                if (m, t, a) in runs and (m, t, b) in runs:
                    states = [read_safetensors(runs[m, t, s][1]) for s in (a, b)]
                    res["pairs"].append({"task": t, "seeds": [a, b],
                                         **pair_report(model(m, t, a), *states, *evals[t], cfg.value)})
        for s in seeds:
            ts = [t for t in task_names if (m, t, s) in runs]
            if len(ts) > 1:
                states = {t: read_safetensors(runs[m, t, s][1]) for t in ts}
                res["merges"].append({"seed": s, **merge_report(model(m, ts[0], s), states,
                                                                 {t: evals[t] for t in ts}, cfg.value)})
    out = Path(cfg.out) if cfg.out else root / "games"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "games.json", json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=1))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("task", "seed", "seeds")} for r in rs]  # noqa: E731
    paths = plot_reports({m: {k: strip(v) for k, v in r.items() if k != "modules"} for m, r in results.items()}, out,
                         "accuracy" if cfg.value == "acc" else "minus cross-entropy")
    print(f"wrote {out / 'games.json'} and {', '.join(p.name for p in paths)} ({format_eta(time.time() - t0)})")
    return results


if __name__ == "__main__":
    main(parse_config(Config, description="Shapley, connectivity, merging and pruning of saved adapters"))
