"""The reports behind the README's analysis tables and plots: every analysis of games.py for one
adapter, a pair of seeds or a set of tasks, on a held-out set, and the plots of many such reports.

    rep = reports.adapter_report(model, x, y, "acc")  # Shapley, structured and unstructured pruning
    curves = reports.pair_report(model, a, b, x, y)   # two seeds' adapters interpolated
    reports.plot_reports({"lora": {"adapters": [rep], "pairs": [curves]}}, "plots")

The model exposes embed / blocks / forward_head (vit.py, lab/gpt2.py); x, y are a held-out set.
"""
import math
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from coto import block_groups
from games import (DELTA, barrier, block_subsets, coalition_values, combine, combine_ties, delta_state,
                   interpolate, prune_factors, prune_magnitude, score, shapley_exact, split_state, use_adapter)
from lora import lora_layers, lora_state_dict


# ---------------------------------------------------------------------------------------------
# Adapters and paths: another task's head, the control's rescaled adapter, q/k/v only, interpolation


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
def use_task(model, state: dict):
    """games.use_adapter that also takes another task's head: "<head>.weight" and "<head>.bias" of a
    plain nn.Linear (not a LoRA layer's base) with another number of outputs put an nn.Linear built
    from them in its place. Everything comes back afterwards."""
    modules, layers, heads = dict(model.named_modules()), lora_layers(model), {}
    for key in state:
        name = key.rpartition(".")[0]
        if name in modules and name not in heads and name.rpartition(".")[0] not in layers:
            head = _other_head(modules[name], state.get(f"{name}.weight"), state.get(f"{name}.bias"))
            if head is not None:
                heads[name] = head
    with ExitStack() as stack:
        # the rest first: use_adapter checks every key before anything changes
        stack.enter_context(use_adapter(model, {k: v for k, v in state.items() if k.rpartition(".")[0] not in heads}))
        for name, head in heads.items():
            parent, _, child = name.rpartition(".")
            parent = model.get_submodule(parent)
            stack.callback(setattr, parent, child, getattr(parent, child))
            setattr(parent, child, head)
        yield model


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


def keep_qkv(deltas: dict, part: str, fused: str = "qkv") -> dict:
    """Keep only the q, k or v rows of each fused qkv delta (timm's layout: rows [q; k; v], each
    of out/3) and zero every other adapter's delta, so only that projection is adapted."""
    if part not in ("q", "k", "v"):
        raise ValueError(f"part={part!r}: choose 'q', 'k' or 'v'")
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


def connectivity(model, evaluate, a: dict, b: dict, lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
                 space: str = "factors") -> dict:
    """Evaluate the path between two adapters of one task: `evaluate(model) -> float` at each
    lambda, interpolating the factors (space="factors") or delta W (space="delta").
    Returns {"lambdas", "values", "barrier", "midpoint", "space"}."""
    if space not in ("factors", "delta"):
        raise ValueError(f"space={space!r}: choose 'factors' (A and B) or 'delta' (delta W)")
    barrier(lambdas, [0.0] * len(lambdas))  # checks the lambdas before the first evaluation
    lambdas = [float(l) for l in lambdas]
    if space == "delta":
        a, b = delta_state(model, a), delta_state(model, b)
    values = []
    for lam in lambdas:
        with use_adapter(model, interpolate(a, b, lam)):
            values.append(float(evaluate(model)))
    gap, mid = barrier(lambdas, values)
    return {"lambdas": lambdas, "values": values, "barrier": gap, "midpoint": mid, "space": space}


# ---------------------------------------------------------------------------------------------
# Reports


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
    average), "delta_avg" (delta-W average), "ties" (TIES on delta W, this density) and "ensemble"
    (no merge: the softmax outputs of every task's adapter averaged, each under the scored task's head)."""
    tasks, device = list(states), next(model.parameters()).device
    parts = {t: split_state(model, states[t]) for t in tasks}  # (adapter, head)
    deltas = [split_state(model, delta_state(model, states[t]))[0] for t in tasks]
    combined = {"single": None,
                "fusion": combine([parts[t][0] for t in tasks], [1 / len(tasks)] * len(tasks)),
                "delta_avg": combine(deltas, [1 / len(tasks)] * len(tasks)),
                "ties": combine_ties(deltas, density)}

    def evaluate(adapter, t):  # task t's value with `adapter` (its own if None) and its own head
        with use_task(model, {**(adapter or parts[t][0]), **parts[t][1]}):
            return score(model, *eval_sets[t], value, batch_size)

    def ensemble(t):  # the mean of the task models' class probabilities (N, C) on task t, under t's head
        x, y = eval_sets[t]
        probs = 0
        for s in tasks:
            with use_task(model, {**parts[s][0], **parts[t][1]}):
                probs = probs + torch.cat([model(x[i:i + batch_size].to(device)).float().softmax(-1).cpu()
                                           for i in range(0, len(x), batch_size)]) / len(tasks)
        return (probs.argmax(-1) == y).double().mean().item() if value == "acc" else \
            probs.gather(-1, y[:, None]).log().double().mean().item()
    out = {name: {t: evaluate(adapter, t) for t in tasks} for name, adapter in combined.items()}
    return {**out, "ensemble": {t: ensemble(t) for t in tasks}}


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

