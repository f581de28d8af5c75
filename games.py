"""What trained adapters can do afterwards: Shapley credit, mode connectivity, combining, pruning.

CoTo (Zhuang et al., ICML 2025, arXiv 2506.05713) claims that its adapters share credit more evenly
across blocks, interpolate between seeds without a barrier, combine better across tasks and survive
pruning (method.md section 4). This file holds the measurements as functions of a model and data
(any game; any model with `embed` / `blocks` / `forward_head`); it knows nothing of where runs are
saved (reproduce.py does, and runs these reports on saved runs):

    Shapley        shapley_exact, shapley_permutation, shapley_multilinear; coalition_values: the
                   value of every coalition of the blocks' adapters, shared prefixes computed once
    adapters       coalition (only some adapter groups on), use_adapter (another adapter: factors or
                   delta W), delta_state, split_state, rescale_to_norm
    connectivity   interpolate, interpolate_delta, barrier, connectivity
    combining      combine (fusion, averaging, task arithmetic), combine_ties
    pruning        block_subsets (structured), keep_qkv, prune_magnitude, prune_factors (unstructured)
    reports        adapter_report, pair_report, combine_report (all of the above on held-out data),
                   plot_reports

("Merging" stays what lora.merge_lora does: folding an adapter into W. Adapters of several seeds or
tasks are *combined*.) A value function maps a frozenset of player indices to a float. A coalition
table is a float64 tensor of 2^n values indexed by bitmask: table[m] = v({i : bit i of m is set}).
Data may live on any device: each batch is moved to the model's device, and every tensor a function
builds follows the model.

    table, _ = coalition_values(model.embed, model.blocks, model.forward_head, x, y, "acc")
    phi = shapley_exact(table, len(model.blocks))     # credit of each block's adapters
"""
import functools
import math
import operator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from coto import active_mask, block_groups
from lora import LoRALinear, lora_layers, lora_state_dict

DELTA = "delta_weight"  # "<layer>.delta_weight": W_eff - W of one LoRA layer, (out, in)
FACTORS = ("lora_A", "lora_B", "lora_magnitude")  # lora.py's parameter names


def _integer(name: str, value, minimum: int, fix: str = "") -> int:
    """value as an int >= minimum, or a ValueError naming the argument (True, 2.5, "3" are refused)."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{fix}")
    return operator.index(value)


def _finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# Shapley values of any cooperative game


def _as_value_fn(value_fn, n: int):
    """A callable frozenset -> float from a (2^n,) coalition table or from a callable, memoized (the
    sampled estimators revisit coalitions often) and checked to be finite (a NaN would spread into
    every Shapley value without a word)."""
    if not callable(value_fn):
        table = _table(value_fn, n)
        return lambda S: float(table[sum(1 << i for i in S)])

    @functools.cache
    def v(S: frozenset) -> float:
        value = float(value_fn(S))
        if not math.isfinite(value):
            raise ValueError(f"value_fn returned {value} for coalition {sorted(S)}: "
                             f"a coalition's value must be a finite number")
        return value
    return v


def _table(values, n: int) -> torch.Tensor:
    table = torch.as_tensor(values, dtype=torch.float64).cpu()
    if table.shape != (2 ** n,):
        raise ValueError(f"a coalition table for n={n} players has shape ({2 ** n},), "
                         f"got {tuple(table.shape)}")
    bad = torch.nonzero(~torch.isfinite(table)).flatten()
    if len(bad):
        raise ValueError(f"the coalition table has non-finite values at bitmasks {bad[:5].tolist()}: "
                         f"every coalition's value must be a finite number")
    return table


def shapley_exact(value_fn, n: int) -> torch.Tensor:
    """Exact Shapley values (n,) float64 from all 2^n coalitions:

        phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S))

    `value_fn` is a callable frozenset -> float or a (2^n,) table (see coalition_values)."""
    n = _integer("n", n, 1, " (the number of players)")
    if n > 20:
        raise ValueError(f"exact Shapley needs 2^n coalition values; n={n} must be at most 20 "
                         f"(use shapley_permutation or shapley_multilinear for more players)")
    if callable(value_fn):
        v = _as_value_fn(value_fn, n)
        value_fn = [v(frozenset(i for i in range(n) if m >> i & 1)) for m in range(2 ** n)]
    table = _table(value_fn, n)
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


def _sampling(n, num_samples) -> tuple:
    return (_integer("n", n, 1, " (the number of players)"),
            _integer("num_samples", num_samples, 2, ": a standard error needs at least 2 samples"))


def shapley_permutation(value_fn, n: int, num_samples: int, generator=None):
    """Monte Carlo Shapley: the average marginal contribution of each player over `num_samples`
    random orderings (Castro et al., 2009). Returns (phi, stderr), both (n,) float64; stderr is
    the sample standard deviation over orderings / sqrt(num_samples). Cost: at most
    num_samples * (n + 1) evaluations (coalitions are memoized)."""
    n, num_samples = _sampling(n, num_samples)
    v = _as_value_fn(value_fn, n)
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
    n, num_samples = _sampling(n, num_samples)
    v = _as_value_fn(value_fn, n)

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
    """Context manager: only the adapter groups in `members` (a collection of indices or names of
    `groups`, e.g. coto.block_groups(model)) are on; every layer's previous `active` flag comes back
    after. An explicit switch: it acts in eval mode too.

        with coalition(block_groups(model), {0, 2}):
            acc = score(model, x, y)
    """
    names = list(groups)
    if isinstance(members, (str, int)):
        raise ValueError(f"members={members!r}: pass a collection of group indices or names, "
                         f"e.g. [{members!r}] (or [] for no adapter at all)")
    members = set(members)
    unknown = [m for m in members if m not in names and not (type(m) is int and 0 <= m < len(names))]
    if unknown:
        raise ValueError(f"coalition members {unknown} are neither indices 0..{len(names) - 1} nor "
                         f"group names ({', '.join(names)})")
    return active_mask(groups, [i in members or name in members for i, name in enumerate(names)])


def _check_eval(modules: nn.Module, x, y, value: str, batch_size) -> int:
    """The checks score and coalition_values share; returns batch_size as an int."""
    if value not in ("acc", "neg_loss"):
        raise ValueError(f"value={value!r}: choose 'acc' (accuracy) or 'neg_loss' (minus cross-entropy)")
    if any(m.training for m in modules.modules()):
        raise ValueError("the model is in training mode (dropout and CoTo's training mask would make "
                         "the values random): call model.eval() first")
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: give one label (or label sequence) "
                         f"per example, at least one")
    return _integer("batch_size", batch_size, 1)


def _metric_sum(logits: torch.Tensor, y: torch.Tensor, value: str) -> float:
    """Summed correct predictions ("acc") or summed minus cross-entropy ("neg_loss"); logits
    (B, C) or (B, T, C), y (B,) or (B, T)."""
    logits, y = logits.flatten(0, -2).float(), y.flatten()
    if value == "acc":
        return (logits.argmax(-1) == y).sum().item()
    return -F.cross_entropy(logits, y, reduction="sum").item()


@torch.no_grad()
def score(model, x: torch.Tensor, y: torch.Tensor, value: str = "acc", batch_size: int = 1000) -> float:
    """Accuracy or minus the mean cross-entropy of model(x) against y (model in eval mode), in
    batches moved to the model's device."""
    batch_size = _check_eval(model, x, y, value, batch_size)
    device = next(model.parameters()).device
    total = sum(_metric_sum(model(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device), value)
                for i in range(0, len(x), batch_size))
    return total / y.numel()


@torch.no_grad()
def coalition_values(embed, blocks, forward_head, x: torch.Tensor, y: torch.Tensor, value: str = "acc",
                     groups: dict | None = None, batch_size: int = 1024):
    """The value of every coalition of adapter groups, for a layered model
    `logits = forward_head(blocks[L-1](... blocks[0](embed(x))))` in eval mode.

    Players are `groups` ({name: [LoRALinear]}, in order, each inside one block; default
    coto.block_groups(blocks): one player per block holding that block's adapters; per-module
    players: `block_groups(model, group_of=lambda n: n)`). value: "acc" (accuracy) or "neg_loss"
    (minus the mean cross-entropy), over all of x (B, ...) / y (B,) or (B, T) with logits (B, C)
    or (B, T, C); batches are moved to the blocks' device.

    Prefix sharing: coalitions that agree on the players of blocks 0..l share the activations after
    block l, so a depth-first walk computes each distinct prefix once. Per batch that is
    sum over l of 2^(players in blocks 0..l) block evaluations; with one player per block,
    2^(L+1) - 2 against L * 2^L for n full forward passes per coalition (L = 6: 126 vs 384;
    L = 12: 8,190 vs 49,152), and at most L activations held at once.

    Returns (values, block_evals): values is (2^n,) float64 indexed by bitmask (bit i = player i),
    ready for shapley_exact(values, n); block_evals counts block calls over all batches."""
    batch_size = _check_eval(blocks, x, y, value, batch_size)
    if any(layer.merged for layer in lora_layers(blocks).values()):
        raise ValueError("the model's adapters are merged into W, so switching them off does nothing: "
                         "call lora.unmerge_lora(model) first")
    groups = block_groups(blocks) if groups is None else groups
    n = len(groups)
    if not 1 <= n <= 20:
        raise ValueError(f"{n} players: coalition_values enumerates 2^n coalitions, n must be in 1..20")
    block_of = {id(m): b for b, block in enumerate(blocks) for m in block.modules()}
    per_block = [[] for _ in blocks]  # for each block, the indices of the players inside it
    for p, (name, layers) in enumerate(groups.items()):
        homes = {block_of.get(id(layer)) for layer in layers}
        if None in homes or len(homes) != 1:
            raise ValueError(f"player {name!r} has layers outside any block or in several blocks "
                             f"({sorted(h for h in homes if h is not None)}); prefix sharing needs each "
                             f"player inside one block (evaluate coalitions with `coalition` instead)")
        per_block[homes.pop()].append(p)
    layers = list(groups.values())
    device = next(blocks.parameters()).device
    total = torch.zeros(2 ** n, dtype=torch.float64)  # summed correct counts or losses, per coalition
    block_evals = 0

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
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            walk(0, embed(xb), 0, yb)
    return total / y.numel(), block_evals


# ---------------------------------------------------------------------------------------------
# Adapters as state dicts: factors ("blocks.0.attn.qkv.lora_A", from lora.lora_state_dict) or
# delta W ("blocks.0.attn.qkv.delta_weight"), plus any other parameter such as the task's head.


@torch.no_grad()
def _copy(p: nn.Parameter, t: torch.Tensor) -> None:
    p.copy_(t)  # in place: p stays the same object (an optimizer or a LoRA layer holds it)


def _set_values(p: nn.Parameter, t: torch.Tensor, stack: ExitStack) -> None:
    """p holds t's values (same shape) until the stack closes, then its own again."""
    stack.callback(_copy, p, p.detach().clone())
    _copy(p, t)


def _set_attr(obj, name: str, value, stack: ExitStack) -> None:
    """obj.<name> is `value` (a module, a flag) until the stack closes, then the old value again."""
    stack.callback(setattr, obj, name, getattr(obj, name))
    setattr(obj, name, value)


def _weight_plus_delta(layer: LoRALinear, delta: torch.Tensor, stack: ExitStack) -> None:
    """Until the stack closes, the layer computes exactly (W + delta) x + b: W holds W + delta and
    the adapter is bypassed."""
    W = layer.base.weight
    _set_values(W, W + delta.to(W), stack)
    _set_attr(layer, "active", False, stack)


def _other_head(module, weight, bias) -> nn.Linear | None:
    """An nn.Linear built from weight (out', in) and bias (out',) when they give the plain
    nn.Linear `module` another number of outputs (another task's head), else None."""
    if (type(module) is not nn.Linear or weight is None or weight.shape == module.weight.shape
            or weight.shape[1:] != module.weight.shape[1:] or (bias is None) != (module.bias is None)
            or (bias is not None and bias.shape != weight.shape[:1])):
        return None
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    head.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return head.to(module.weight).requires_grad_(module.weight.requires_grad).train(module.training)


@contextmanager
def use_adapter(model, state: dict):
    """Evaluate `model` with another adapter for a while; everything it touched comes back after.

    Keys of `state`, each applied explicitly:
    - a parameter's name ("blocks.0.attn.qkv.lora_A", "head.weight", ...): its values are copied
      into that parameter, which must have the same shape;
    - "<layer>.delta_weight" (out, in), for a LoRA layer: W holds W + delta and the layer's adapter
      is bypassed, so the layer computes exactly W + delta. That is how averaged, TIES-combined and
      pruned delta-W adapters are evaluated for any variant (DoRA and HiRA too), without
      re-factorising them into a rank-r A and B;
    - "<head>.weight" and "<head>.bias" for a plain nn.Linear (not a LoRA layer's base) with another
      number of outputs (another task's head): an nn.Linear built from them takes its place.
    Bad keys and shapes are a ValueError before anything changes."""
    layers, params, modules = lora_layers(model), dict(model.named_parameters()), dict(model.named_modules())
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's adapters are merged into W: call lora.unmerge_lora(model) first")
    heads, plan = {}, []  # plan: one function per change; the ExitStack it is given undoes it
    for key, t in state.items():
        name, _, leaf = key.rpartition(".")
        if name in heads:  # the other half of a replaced head
            continue
        head = None
        if name in modules and name.rpartition(".")[0] not in layers:
            head = _other_head(modules[name], state.get(f"{name}.weight"), state.get(f"{name}.bias"))
        if leaf == DELTA and name in layers:
            if t.shape != layers[name].base.weight.shape:
                raise ValueError(f"{key}: a delta of shape {tuple(t.shape)} for a weight of shape "
                                 f"{tuple(layers[name].base.weight.shape)}: computed on another model?")
            plan.append(functools.partial(_weight_plus_delta, layers[name], t))
        elif head is not None:
            heads[name] = head
            parent, _, child = name.rpartition(".")
            plan.append(functools.partial(_set_attr, model.get_submodule(parent), child, head))
        elif key not in params:
            raise ValueError(f"{key} is not a parameter of this model (nor a LoRA layer's {DELTA}): "
                             f"was the state saved from another model or with other targets?")
        elif t.shape != params[key].shape:
            raise ValueError(f"{key}: shape {tuple(t.shape)} in the state, {tuple(params[key].shape)} "
                             f"in the model (another r, model size or number of classes?)")
        else:
            plan.append(functools.partial(_set_values, params[key], t.to(params[key])))
    with ExitStack() as stack:
        for change in plan:
            change(stack)
        yield model


@torch.no_grad()
def delta_state(model, state: dict | None = None) -> dict:
    """{"<layer>.delta_weight": W_eff - W (out, in)} for every LoRA layer, of the model's current
    adapter or of `state` (loaded with use_adapter for the while); `state`'s own delta_weight
    entries and its entries that are not adapter keys (a head) are passed through unchanged, so the
    result can be given to use_adapter as it is."""
    layers = lora_layers(model)
    factors, other = split_state(model, state or {})
    with use_adapter(model, {k: v for k, v in factors.items() if not k.endswith(DELTA)}):
        deltas = {f"{name}.{DELTA}": layer.delta_weight().detach().clone() for name, layer in layers.items()}
    return {**deltas, **{k: v for k, v in factors.items() if k.endswith(DELTA)}, **other}


def split_state(model, state: dict):
    """(adapter entries, other entries such as a head): a key is an adapter entry when the module
    it belongs to is one of the model's LoRA layers (by module type, not by name pattern)."""
    layers = lora_layers(model)
    adapter = {k: v for k, v in state.items() if k.rpartition(".")[0] in layers}
    return adapter, {k: v for k, v in state.items() if k not in adapter}


@torch.no_grad()
def rescale_to_norm(model, state: dict, reference: dict) -> dict:
    """`state` (a factor state) with each layer's lora_B scaled so that the layer's delta W has the
    Frobenius norm of `reference`'s delta W: the same directions, the other adapter's size per
    layer. delta W is linear in B for LoRA and HiRA, so the norms then match exactly; A, which in
    LoRA stays near its random init while B grows from zero, is kept. Other entries (a head) are
    kept from `state`. (The control "a smaller update": LoRA rescaled to CoTo's per-layer norm.)"""
    layers = lora_layers(model)
    dora = [name for name, layer in layers.items() if layer.variant not in ("lora", "hira")]
    if dora:
        raise ValueError(f"rescale_to_norm scales lora_B, which scales delta W for lora and hira layers only; "
                         f"{dora[0]} is a {layers[dora[0]].variant} layer")
    for what, s in (("state", state), ("reference", reference)):
        missing = [f"{name}.{k}" for name in layers for k in ("lora_A", "lora_B") if f"{name}.{k}" not in s]
        if missing:
            raise ValueError(f"{what} lacks {missing[0]} (and {len(missing) - 1} more): give both full factor "
                             f"states (lora.lora_state_dict) of this model")
    own, ref = delta_state(model, state), delta_state(model, reference)
    out = dict(state)
    for name in layers:
        norm = own[f"{name}.{DELTA}"].norm().item()
        if norm == 0.0:
            raise ValueError(f"{name}: delta W of `state` is zero, no scaling gives it another norm")
        out[f"{name}.lora_B"] = state[f"{name}.lora_B"] * (ref[f"{name}.{DELTA}"].norm().item() / norm)
    return out


# ---------------------------------------------------------------------------------------------
# Mode connectivity and combining adapters


def combine(states: list, weights) -> dict:
    """sum_k weights[k] * states[k], key by key, on the device of states[0]. Factor averaging
    ("fusion", the paper's multi-task combination): factor states with weights 1/K; delta-W
    averaging: delta states with 1/K; task arithmetic: delta states with a weight lambda each;
    interpolation: [a, b] with [1 - lam, lam]."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} states and {len(weights)} weights: give one weight per state")
    weights = [_finite(f"weights[{k}]", w) for k, w in enumerate(weights)]
    keys = set(states[0])
    for k, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"state {k} has other keys than state 0 (e.g. "
                             f"{sorted(set(s) ^ keys)[:3]}): combine states of the same model and targets")
        bad = [key for key in keys if s[key].shape != states[0][key].shape]
        if bad:
            raise ValueError(f"state {k} and state 0 differ in the shape of {bad[:3]} "
                             f"(e.g. {tuple(s[bad[0]].shape)} vs {tuple(states[0][bad[0]].shape)}): "
                             f"another r or model size; heads of different tasks are not combined")
    return {key: sum(w * s[key].to(states[0][key].device) for w, s in zip(weights, states)) for key in states[0]}


def interpolate(a: dict, b: dict, lam: float) -> dict:
    """theta(lam) = (1 - lam) a + lam b on every tensor: on the A and B factors for factor states
    (the paper's "linear fusion"), or on delta W for delta states (see interpolate_delta)."""
    lam = _finite("lam", lam)
    return combine([a, b], [1.0 - lam, lam])


def interpolate_delta(model, a: dict, b: dict, lam: float) -> dict:
    """Interpolate delta W = W_eff - W instead of the factors: (1 - lam) dW_a + lam dW_b. For plain
    LoRA this differs from interpolating A and B by the cross terms lam (1 - lam) (B_a - B_b)(A_a - A_b)."""
    return interpolate(delta_state(model, a), delta_state(model, b), lam)


def _lambdas(lambdas) -> list:
    lambdas = [float(l) for l in lambdas]
    if (len(lambdas) < 3 or lambdas[0] != 0.0 or lambdas[-1] != 1.0 or 0.5 not in lambdas
            or any(b <= a for a, b in zip(lambdas, lambdas[1:]))):
        raise ValueError(f"lambdas {lambdas} must increase from 0 to 1 and contain 0.5, "
                         f"e.g. (0, 0.25, 0.5, 0.75, 1)")
    return lambdas


def barrier(lambdas, values) -> tuple:
    """(barrier, midpoint) of an interpolation curve: the largest drop of values[k] below the
    straight line between the two endpoints (0 when the curve never dips below it), and the value
    at lambda = 0.5. lambdas must increase from 0 to 1 and contain 0.5."""
    lambdas, values = _lambdas(lambdas), [float(v) for v in values]
    if len(values) != len(lambdas):
        raise ValueError(f"{len(lambdas)} lambdas but {len(values)} values: give one value per lambda")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values {values} must be finite: a NaN would hide any barrier "
                         f"(check the evaluation that produced them)")
    line = [(1 - l) * values[0] + l * values[-1] for l in lambdas]
    return max(0.0, max(ln - v for ln, v in zip(line, values))), values[lambdas.index(0.5)]


def connectivity(model, evaluate, a: dict, b: dict, lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
                 space: str = "factors") -> dict:
    """Evaluate the path between two adapters of one task: `evaluate(model) -> float` at each
    lambda, interpolating the factors (space="factors") or delta W (space="delta").
    Returns {"lambdas", "values", "barrier", "midpoint", "space"}."""
    if space not in ("factors", "delta"):
        raise ValueError(f"space={space!r}: choose 'factors' (A and B) or 'delta' (delta W)")
    lambdas = _lambdas(lambdas)  # checked before the first evaluation
    if space == "delta":
        a, b = delta_state(model, a), delta_state(model, b)
    values = []
    for lam in lambdas:
        with use_adapter(model, interpolate(a, b, lam)):
            values.append(float(evaluate(model)))
    gap, mid = barrier(lambdas, values)
    return {"lambdas": lambdas, "values": values, "barrier": gap, "midpoint": mid, "space": space}


def _smallest(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest |t| entries (ties broken by position), same shape as t."""
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    mask[t.abs().flatten().argsort(stable=True)[:k]] = True
    return mask.view_as(t)


def _no_factors(deltas: dict, what: str) -> None:
    """Magnitudes of A and B mean nothing alone: these functions take delta W."""
    factors = [k for k in deltas if k.rpartition(".")[2] in FACTORS]
    if factors:
        raise ValueError(f"{what} works on delta W, but the state holds factors ({factors[0]}, ...): "
                         f"pass delta_state(model, state) instead")


def combine_ties(deltas: list, density: float = 0.2, lam: float = 1.0) -> dict:
    """TIES-merging (Yadav et al., NeurIPS 2023) of task vectors, here each task's delta W, tensor
    by tensor: (1) trim: keep the round(density * numel) largest magnitudes of each task's tensor;
    (2) elect: the sign of the sum of the trimmed tensors, per entry; (3) disjoint mean: average,
    per entry, only the trimmed values that are non-zero and agree with the elected sign;
    then scale by lam."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]: the fraction of entries each task keeps")
    lam = _finite("lam", lam)
    for d in deltas:
        _no_factors(d, "combine_ties")
    combine(deltas, [1.0] * len(deltas))  # validates that the keys and shapes agree
    out = {}
    for key in deltas[0]:
        t = torch.stack([d[key] for d in deltas])  # (tasks, ...)
        n = t[0].numel()
        trimmed = torch.stack([x.masked_fill(_smallest(x, n - round(density * n)), 0.0) for x in t])
        sign = trimmed.sum(0).sign()
        agree = (trimmed.sign() == sign) & (trimmed != 0)
        out[key] = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


# ---------------------------------------------------------------------------------------------
# Pruning


def block_subsets(n: int) -> dict:
    """The structured pruning patterns over n blocks, as the blocks that KEEP their adapters:
    every other block (drop blocks 1, 3, 5, ...), or only the low, middle or high third.
    Evaluate one with `with coalition(groups, keep): evaluate(model)` (exact for any variant).
    With fewer than 3 blocks, the thirds that hold no block are left out (they are no pruning)."""
    n = _integer("n", n, 1, " (the number of blocks)")
    thirds = {name: list(range(i * n // 3, (i + 1) * n // 3)) for i, name in enumerate(("low", "middle", "high"))}
    return {"every_other": list(range(0, n, 2)), **{name: keep for name, keep in thirds.items() if keep}}


def keep_qkv(deltas: dict, part: str, fused: str = "qkv") -> dict:
    """Keep only the q, k or v rows of each fused qkv delta (timm's layout: rows [q; k; v], each
    of out/3) and zero every other adapter's delta, so only that projection is adapted."""
    if part not in ("q", "k", "v"):
        raise ValueError(f"part={part!r}: choose 'q', 'k' or 'v'")
    _no_factors(deltas, "keep_qkv")
    out = {key: torch.zeros_like(d) if key.endswith(DELTA) else d for key, d in deltas.items()}
    qkv = [key for key in deltas if key.split(".")[-2:] == [fused, DELTA]]
    if not qkv:
        raise ValueError(f"no '{fused}' delta_weight in the state: q/k/v pruning needs a fused "
                         f"{fused} target (pass delta_state(model, adapter))")
    for key in qkv:
        d = deltas[key]
        if d.shape[0] % 3:
            raise ValueError(f"{key} has {d.shape[0]} rows, not a multiple of 3: not a fused [q; k; v] layer")
        i, rows = "qkv".index(part), d.shape[0] // 3
        out[key][i * rows:(i + 1) * rows] = d[i * rows:(i + 1) * rows]
    return out


def _prune(state: dict, sparsity: float, leaves: tuple, hint: str) -> dict:
    """The tensors whose key ends in one of `leaves` pruned (see prune_magnitude), the others kept."""
    prunable = {k for k in state if k.rpartition(".")[2] in leaves}
    if not prunable:
        raise ValueError(f"no {' / '.join(leaves)} key in the state ({', '.join(list(state)[:3])}...): {hint}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    return {k: t.masked_fill(_smallest(t, round(sparsity * t.numel())), 0.0) if k in prunable else t
            for k, t in state.items()}


def prune_magnitude(deltas: dict, sparsity: float) -> dict:
    """Unstructured pruning of delta W: zero the round(sparsity * numel) smallest-magnitude entries
    of each delta W (ties broken by position); other entries (a head) are kept."""
    _no_factors(deltas, "prune_magnitude")
    return _prune(deltas, sparsity, (DELTA,), "nothing to prune; pass delta_state(model, state)")


def prune_factors(state: dict, sparsity: float) -> dict:
    """Unstructured pruning of the factors, as prune_magnitude does on each lora_A (r, in) and each
    lora_B (out, r) separately: a likelier reading of the paper's "adapter weights" than delta W.
    delta W = B A of pruned factors is then usually denser than `sparsity`. Other entries (a head,
    DoRA's magnitude) are kept."""
    return _prune(state, sparsity, ("lora_A", "lora_B"), "prune_factors takes a factor state "
                  "(lora.lora_state_dict); prune delta W with prune_magnitude")


# ---------------------------------------------------------------------------------------------
# Reports: every analysis above for one adapter, a pair of seeds, or a set of tasks. The model
# exposes embed / blocks / forward_head; x, y are a held-out set (float inputs, labels).


@torch.no_grad()
def adapter_report(model, x, y, value: str = "acc", sparsities=(0.3, 0.5, 0.7), batch_size: int = 1000) -> dict:
    """Shapley values of the blocks' adapters (exact, prefix-shared; players: coto.block_groups),
    structured pruning (block subsets: read off the same coalition table), q/k/v-only, and
    unstructured pruning of delta W ("unstructured") and of the A and B factors
    ("unstructured_factors") of the adapter the model holds (in eval mode).

    The "share" of a block is phi_i / sum(phi) = phi_i / (v(all) - v(none)): its part of what the
    adapters gain together. Shares sum to 1; a negative share is a block whose adapters hurt on
    average over coalitions (the other blocks then hold more than all of the gain). When the
    adapters gain nothing (v(all) <= v(none)) there is no gain to share and "share" is None."""
    groups = block_groups(model)
    table, evals = coalition_values(model.embed, model.blocks, model.forward_head, x, y, value,
                                    groups=groups, batch_size=batch_size)
    n = len(model.blocks)
    if len(groups) != n:
        raise ValueError(f"adapter_report needs adapters in every block (one player per block); "
                         f"the adapted blocks are {', '.join(groups)}")
    phi = shapley_exact(table, n)
    gain = (table[-1] - table[0]).item()
    share = (phi / gain).tolist() if gain > 0 else None
    subsets = block_subsets(n)
    deltas, factors = delta_state(model), lora_state_dict(model)

    def evaluate(state):  # the model's value with `state` in place of its adapter
        with use_adapter(model, state):
            return score(model, x, y, value, batch_size)
    report = {
        "full": table[-1].item(), "none": table[0].item(), "shapley": phi.tolist(), "share": share,
        "top_third_share": sum(share[i] for i in subsets["high"]) if share and "high" in subsets else None,
        "block_evals": evals, "naive_block_evals": n * 2 ** n * math.ceil(len(x) / batch_size),
        "structured": {name: table[sum(1 << b for b in keep)].item() for name, keep in subsets.items()},
        "unstructured": {str(s): evaluate(prune_magnitude(deltas, s)) for s in sparsities},
        "unstructured_factors": {str(s): evaluate(prune_factors(factors, s)) for s in sparsities},
    }
    if any(k.endswith(f"qkv.{DELTA}") for k in deltas):
        report["qkv"] = {part: evaluate(keep_qkv(deltas, part)) for part in "qkv"}
    return report


@torch.no_grad()
def pair_report(model, a: dict, b: dict, x, y, value: str = "acc",
                lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), batch_size: int = 1000) -> dict:
    """Mode connectivity between two adapters (factor states, heads included) of one task:
    {"factors": curve, "delta": curve, "factors_head_a": curve}, each with its barrier and midpoint
    (see connectivity). "factors" and "delta" interpolate the heads too (two seeds' heads start
    from different random inits); "factors_head_a" interpolates the adapters alone and keeps a's
    head all along, so only the adapters are measured (its lambda = 1 end is b's adapter under
    a's head)."""
    evaluate = lambda m: score(m, x, y, value, batch_size)  # noqa: E731
    curves = {space: connectivity(model, evaluate, a, b, lambdas, space) for space in ("factors", "delta")}
    b_head_a = {**split_state(model, b)[0], **split_state(model, a)[1]}
    curves["factors_head_a"] = connectivity(model, evaluate, a, b_head_a, lambdas, "factors")
    return curves


@torch.no_grad()
def combine_report(model, states: dict, eval_sets: dict, value: str = "acc", density: float = 0.2,
                   batch_size: int = 1000) -> dict:
    """Combine the adapters of several tasks ({task: factor state with its head}) and evaluate every
    task with its own head ({task: (x, y)}): "single" (each task's own adapter), "fusion" (factor
    average), "delta_avg" (delta-W average) and "ties" (TIES on delta W, this density)."""
    tasks = list(states)
    parts = {t: split_state(model, states[t]) for t in tasks}  # (adapter, head)
    deltas = [split_state(model, delta_state(model, states[t]))[0] for t in tasks]
    combined = {"single": None,
                "fusion": combine([parts[t][0] for t in tasks], [1 / len(tasks)] * len(tasks)),
                "delta_avg": combine(deltas, [1 / len(tasks)] * len(tasks)),
                "ties": combine_ties(deltas, density)}

    def evaluate(adapter, t):  # task t's value with `adapter` (its own if None) and its own head
        with use_adapter(model, {**(adapter or parts[t][0]), **parts[t][1]}):
            return score(model, *eval_sets[t], value, batch_size)
    return {name: {t: evaluate(adapter, t) for t in tasks} for name, adapter in combined.items()}


def plot_reports(reports: dict, out_dir, ylabel: str = "accuracy", about: str = "") -> list:
    """PNG plots of {method: {"adapters": [adapter_report], "pairs": [pair_report],
    "combinations": [combine_report]}} (methods side by side): shapley.png, interpolation.png,
    combining.png, pruning.png in out_dir. Bars and points are means over the reports (runs) with
    their standard deviation; `about` (regime, tasks, seeds) goes under each title; the dashed line
    is the model without adapters. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def spread(xs):  # (mean, standard deviation) over runs
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{about}" if about else title, fontsize="medium")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    def bars(name, title, ylabel, labels, runs, floor=None, width=7):  # runs: {method: [[value per run] per label]}
        fig, ax = plt.subplots(figsize=(width, 3.5))
        bar = 0.8 / len(runs)
        lows, highs = [], []
        for k, (m, per_label) in enumerate(runs.items()):
            means, errs = zip(*(spread(xs) for xs in per_label))
            ax.bar([i + k * bar for i in range(len(labels))], means, bar, yerr=errs, capsize=2,
                   label=f"{m} ({len(per_label[0])} runs)")
            lows += [v - e for v, e in zip(means, errs)]
            highs += [v + e for v, e in zip(means, errs)]
        if floor is not None:
            ax.axhline(floor, color="grey", ls="--", lw=1, label="no adapters (mean)")
            lows.append(floor)
        pad = 0.1 * (max(highs) - min(lows)) or 0.01
        if min(lows) > 0:  # zoomed in, so gaps of a few points show; the label says so
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
            ylabel += " (axis not from 0)"
        ax.set_ylabel(ylabel)
        ax.set_xticks([i + 0.4 - bar / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        save(fig, name, title)

    adapters, pairs, combos = ({m: r[kind] for m, r in reports.items() if r.get(kind)}
                               for kind in ("adapters", "pairs", "combinations"))
    shares = {m: [r["share"] for r in rs if r["share"] is not None] for m, rs in adapters.items()}
    shares = {m: s for m, s in shares.items() if s}  # adapters that gain nothing have no shares
    if shares:
        n = len(next(iter(shares.values()))[0])
        bars("shapley.png", "credit per block (exact Shapley; below 0: the block's adapters hurt)",
             "share of v(all) - v(none)", [f"block {i}" for i in range(n)],
             {m: [[s[i] for s in ss] for i in range(n)] for m, ss in shares.items()})
    if adapters:
        first = next(iter(adapters.values()))[0]
        parts = [("full", lambda r: r["full"]),
                 *((k, lambda r, k=k: r["structured"][k]) for k in first["structured"]),
                 *((f"only {k}", lambda r, k=k: r["qkv"][k]) for k in first.get("qkv", {})),
                 *((f"{float(k):.0%} sparse dW", lambda r, k=k: r["unstructured"][k]) for k in first["unstructured"]),
                 *((f"{float(k):.0%} sparse A, B", lambda r, k=k: r["unstructured_factors"][k])
                   for k in first["unstructured_factors"])]
        bars("pruning.png", "pruning the adapters (structured: blocks kept; unstructured: delta W or A, B)", ylabel,
             [name for name, _ in parts], {m: [[get(r) for r in rs] for _, get in parts] for m, rs in adapters.items()},
             floor=spread([r["none"] for rs in adapters.values() for r in rs])[0], width=9)
    if pairs:
        spaces = list(next(iter(pairs.values()))[0])  # factors, delta, factors_head_a
        fig, axes = plt.subplots(1, len(spaces), figsize=(4.5 * len(spaces), 3.5), sharey=True)
        for ax, space in zip(axes, spaces):
            for m, rs in pairs.items():
                lam = rs[0][space]["lambdas"]
                means, errs = zip(*(spread([r[space]["values"][i] for r in rs]) for i in range(len(lam))))
                ax.errorbar(lam, means, yerr=errs, fmt="o-", capsize=2, label=f"{m} ({len(rs)} seed pairs)")
            ax.set_xlabel("lambda (0: one seed, 1: the other)")
            ax.set_title(f"interpolating {space.replace('_head_a', ', head of seed a held')}", fontsize="medium")
        axes[0].set_ylabel(ylabel), axes[-1].legend(loc="lower right", fontsize="small")
        save(fig, "interpolation.png", "interpolating two seeds' adapters")
    if combos:
        kinds = list(next(iter(combos.values()))[0])
        bars("combining.png", "combining the tasks' adapters (each task with its own head)",
             f"{ylabel}, mean over tasks", kinds,
             {m: [[sum(r[k].values()) / len(r[k]) for r in rs] for k in kinds] for m, rs in combos.items()})
    return written


if __name__ == "__main__":
    raise SystemExit("games.py is a library; to analyse the runs train_vit.py saved: "
                     "python reproduce.py --analyse <its --out-dir>")
