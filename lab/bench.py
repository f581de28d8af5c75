"""Speed and memory of LoRA / DoRA / HiRA, with and without CoTo, measured side by side.

CoTo shortens training because a bypassed adapter costs nothing and backward stops below the
lowest active block (CoTo, arXiv 2506.05713). This script measures how much of that saving is real,
next to what the FLOP arithmetic allows, plus the other costs a user asks about:

    1. training steps over a CoTo schedule vs always-on adapters (lora, dora, hira; two ViTs)
    2. backward truncation: step time vs the lowest active block
    3. the layer race: one adapted layer's forward+backward vs the frozen nn.Linear it wraps, for
       lora.py's classroom layer, lab/kernels.py's hand-written one and PEFT's LoRA and DoRA layers
       (when peft is installed); merged and unmerged inference vs base
    4. exact Shapley: the table of all 2^n coalition values, prefix-sharing vs naive (games.py)
    5. peak memory of a LoRA step vs full fine-tuning, beside PEFT's

Every figure is a ratio measured in the same run: the compared cases alternate call by call (so
the drift of a busy machine hits them alike), warm-up calls are excluded, and each ratio is the
median over repeats. On CUDA the steps run in bf16 autocast (the layer table adds fp32).

    OMP_NUM_THREADS=1 python -m lab.bench               # a few minutes on a 2-core CPU; writes runs/bench/
    OMP_NUM_THREADS=1 python -m lab.bench --quick       # about a minute, one ViT, noisier
    OMP_NUM_THREADS=1 python -m lab.bench --layer-only  # the layer race alone, seconds
"""
import contextlib
import copy
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import games
from coto import CoTo, block_groups
from lab.kernels import FastLoRALinear
from lora import VARIANTS, LoRALinear, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora
from lab.utils import atomic_write_text, format_eta, run_script
from train_toy import pick_device
from vit import VisionTransformer


def ints(text: str):  # "6,12" -> [6, 12], "" -> []; None if a part is not an integer
    try:
        return [int(t) for t in text.split(",")] if text else []
    except ValueError:
        return None


@dataclasses.dataclass
class Config:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (use 1 on a machine shared with other jobs)
    embed_dim: int = 128  # width of the default ViT (vit.py's default)
    depth: int = 6  # blocks of the default ViT
    num_heads: int = 4  # attention heads of the default ViT
    large_embed_dim: int = 192  # width of the larger ViT of sections 1 and 5 (ViT-Ti's)
    large_depth: int = 12  # blocks of the larger ViT (twice as deep); 0 skips it
    large_num_heads: int = 3  # attention heads of the larger ViT
    variants: str = "lora,dora,hira"  # comma-separated adapter variants measured: any of lora, dora, hira
    targets: str = "qkv,proj,fc1,fc2"  # comma-separated nn.Linear name suffixes that get adapters in every block
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # scaling = alpha / r
    batch_size: int = 32  # images per training step (28x28, 17 tokens each)
    total_steps: int = 1000  # length of the CoTo schedule whose masks are replayed
    p0: float = 0.0  # CoTo's starting probability
    stage1_ratio: float = 0.75  # CoTo ramps p over this fraction of total_steps
    schedule_points: int = 12  # steps of that schedule measured, evenly spaced over it
    repeats: int = 3  # rounds of alternating calls; every figure is the median over rounds
    warmup: int = 2  # calls of each case before timing (excluded)
    shapley_blocks: str = "6,12"  # comma-separated depths of the exact-Shapley rows ("": none)
    shapley_batch: int = 16  # held-out images the coalition values are computed on
    naive_samples: int = 32  # coalitions timed for the naive way (its time is per coalition x 2^n)
    layer_shape: str = "2048,384,1536"  # tokens,in,out of the layer table (a ViT-S fc1)
    peft: bool = True  # PEFT's LoRA and DoRA beside ours in the layer and memory tables (if installed)
    quick: bool = False  # one ViT, fewer steps and coalitions: about a minute
    layer_only: bool = False  # only section 3's layer race (nn.Linear, classroom, lab kernels, PEFT): seconds
    seed: int = 0  # seed of the weights, the random batches and CoTo's draws
    out: str = "runs/bench"  # folder that gets bench.json and bench.md (made if missing)

    def __post_init__(self):  # every flag checked before any benchmark runs: one line naming it and what it accepts
        def vit_ok(dim, depth, heads):  # vit.py splits the width over the heads
            return dim >= 1 and depth >= 2 and heads >= 1 and dim % heads == 0
        nearest = next(p for p in (Path(self.out), *Path(self.out).parents) if p.exists())  # made there
        blocks, shape = ints(self.shapley_blocks), ints(self.layer_shape)
        rules = [  # (the fields, their values are fine, what they accept)
            (["threads"], self.threads >= 0, "0 (torch's default) or a number of threads >= 1"),
            (["embed_dim", "depth", "num_heads"], vit_ok(self.embed_dim, self.depth, self.num_heads),
             "depth >= 2 (CoTo needs a block to skip) and num-heads >= 1 dividing embed-dim"),
            (["large_embed_dim", "large_depth", "large_num_heads"], self.large_depth == 0 or vit_ok(
                self.large_embed_dim, self.large_depth, self.large_num_heads),
             "large-depth 0 (no larger ViT), or >= 2 with large-num-heads >= 1 dividing large-embed-dim"),
            (["variants"], set(self.variants.split(",")) <= set(VARIANTS), "comma-separated, any of " + ", ".join(VARIANTS)),
            (["targets"], set(self.targets.split(",")) <= {"qkv", "proj", "fc1", "fc2"},
             "comma-separated, any of qkv, proj, fc1, fc2"),
            (["r"], self.r >= 1, "an integer >= 1"),
            (["alpha"], math.isfinite(self.alpha), "a finite number"),
            (["p0"], 0 <= self.p0 <= 1, "a probability in [0, 1]"),
            (["stage1_ratio"], 0 < self.stage1_ratio <= 1, "a fraction in (0, 1]"),
            (["warmup"], self.warmup >= 0, "an integer >= 0"),
            (["seed"], self.seed >= 0, "an integer >= 0"),
            (["shapley_blocks"], blocks is not None and all(1 <= b <= 12 for b in blocks),
             "comma-separated depths in 1..12 (all 2^depth coalitions are evaluated), or ''"),
            (["layer_shape"], shape is not None and len(shape) == 3 and min(shape) >= 1,
             "three comma-separated integers >= 1: tokens,in,out"),
            (["out"], self.out and nearest.is_dir() and os.access(nearest, os.W_OK), "a folder that can be written"),
        ] + [([k], getattr(self, k) >= 1, "an integer >= 1") for k in (
            "batch_size", "total_steps", "schedule_points", "repeats", "shapley_batch", "naive_samples")]
        for fields, ok, allowed in rules:
            if not ok:
                values = [getattr(self, k) for k in fields]
                raise ValueError(" ".join(f"--{k.replace('_', '-')} " + (repr(v) if v == "" else str(v))
                                          for k, v in zip(fields, values))
                                 + f": give {allowed}")
        pick_device(self.device)  # --device cuda without CUDA: one line


QUICK = dict(large_depth=0, schedule_points=8, shapley_blocks="6")  # what --quick overrides



# The measuring harness


def alternate(cases: dict, calls: int, repeats: int, warmup: int, device=torch.device("cpu")) -> dict:
    """Time `cases[name](i)` for i in range(calls), alternating the cases call by call and
    reversing their order every other call, so machine drift hits every case alike.

    Returns {name: {"s": median over repeats of the time of all `calls` calls, "ratio": median over
    repeats of that time divided by the first case's time in the same repeat}}. The `warmup`
    calls of each case before the first repeat are not timed."""
    # what makes a timer honest on this device: CUDA runs asynchronously, the CPU does not
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(cases)
    for i in range(warmup):
        for name in names:
            cases[name](i % calls)
    total = {name: [0.0] * repeats for name in names}
    for rep in range(repeats):
        for i in range(calls):
            for name in names if (rep + i) % 2 == 0 else names[::-1]:
                sync()
                t0 = time.perf_counter()
                cases[name](i)
                sync()
                total[name][rep] += time.perf_counter() - t0
    base = total[names[0]]
    return {name: {"s": statistics.median(t),
                   "ratio": statistics.median(a / b for a, b in zip(t, base))}
            for name, t in total.items()}


# The FLOP model: matmul FLOPs, as lora.py (or lab/kernels.py, fast) computes each variant
# (tests/test_bench.py checks it against torch's FlopCounterMode). Elementwise work (norms, GELU,
# the adapters' adds and scales) is not counted: on a CPU it is where measured and predicted part ways.


def linear_flops(T: int, i: int, o: int, r: int, variant: str, active: bool, grad_in: bool,
                 fast: bool = False) -> int:
    """Forward + backward matmul FLOPs of one frozen (o, i) linear layer on T tokens, its adapter
    active or bypassed. The frozen W needs no weight gradient: backward computes only dX, and only
    when the layer's input requires grad (grad_in)."""
    flops = 2 * T * i * o + (2 * T * i * o if grad_in else 0)  # W x; dX = dY W
    if not active:
        return flops
    if variant in ("lora", "dora"):  # forward: A x, then B (A x); the fast kernel (no dropout)
        fused = fast and T * (i + o) >= i * o  # folds B A into W from i o / (i + o) tokens on
        flops += 2 * T * r * i + (2 * o * r * i if fused else 2 * T * r * o)
        flops += 2 * T * r * (2 * o + i) + (2 * T * r * i if grad_in else 0)  # dy B, dB, dA; dX via A
    if variant == "dora":  # B A inside the row norm ||W + s B A||, which is detached: no backward
        flops += 2 * o * r * i
    if variant == "hira":  # B A; dD = dY^T x for D = s W * (B A); dB and dA of B A
        flops += 2 * o * r * i + 2 * T * i * o + 4 * o * r * i
        if not fast:  # the classroom runs x D^T beside W x (and dY D beside dY W); the fast one W + D
            flops += 2 * T * i * o + (2 * T * i * o if grad_in else 0)
    return flops


def vit_step_flops(model: VisionTransformer, batch: int, r: int, variant: str, mask,
                   targets: str = "qkv,proj,fc1,fc2", fast: bool = False) -> int:
    """Matmul FLOPs of one training step of `model` (frozen backbone, adapters on `targets`, a
    trainable head) with block l's adapters on where mask[l] is true.

    Walks the blocks bottom-up, tracking whether the residual stream requires grad: it does not
    below the lowest active block (the embedding is frozen), so nothing there runs backward."""
    pe = model.patch_embed
    N, D, C = pe.num_patches + 1, model.embed_dim, model.head.out_features  # tokens, width, classes
    T = batch * N
    flops = 2 * batch * pe.num_patches * pe.in_chans * pe.patch_size ** 2 * D  # patch conv, no grad
    grad = False  # does the residual stream require grad?
    for on, blk in zip(mask, model.blocks):
        H = blk.mlp.fc1.out_features
        for t, i, o in (("qkv", D, 3 * D), ("proj", D, D), ("fc1", D, H), ("fc2", H, D)):
            active = bool(on) and t in targets.split(",")
            flops += linear_flops(T, i, o, r, variant, active, grad, fast)
            grad = grad or active  # an active adapter makes everything above it require grad
            if t == "qkv":  # attention between qkv and proj: q k^T and a v, and their backward
                flops += 4 * batch * N * N * D + (8 * batch * N * N * D if grad else 0)
    return flops + 2 * batch * D * C * (2 + grad)  # head: forward, dW, and dX if grad


def coto_masks(depth: int, total_steps: int, points: int, p0: float, stage1_ratio: float,
               seed: int) -> list:
    """The masks CoTo draws at `points` evenly spaced steps of a `total_steps` schedule, drawn by
    the training controller itself (coto.CoTo) over stand-in groups."""
    coto = CoTo({f"blocks.{l}": [] for l in range(depth)}, total_steps, p0=p0,
                stage1_ratio=stage1_ratio, seed=seed)
    steps = [round(k * (total_steps - 1) / max(points - 1, 1)) for k in range(points)]
    return [coto.step(t).tolist() for t in steps]


# Models and steps


def set_mask(groups: dict, mask) -> None:
    """Group l's adapters on where mask[l] is true: the user's `active` switch, until set again."""
    for on, layers in zip(mask, groups.values(), strict=True):
        for layer in layers:
            layer.active = bool(on)


def vit_sizes(cfg: Config) -> dict:
    """{"default": VisionTransformer kwargs, "large": ...} from the config."""
    sizes = {"default": dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)}
    if cfg.large_depth:
        sizes["large"] = dict(embed_dim=cfg.large_embed_dim, depth=cfg.large_depth,
                              num_heads=cfg.large_num_heads)
    return sizes


def lora_vit(size: dict, variant: str | None, cfg: Config, device: torch.device,
             peft: bool = False) -> VisionTransformer:
    """VisionTransformer(**size) with adapters on cfg.targets, B != 0 as after some training, and
    only adapters and head trainable; variant None: the plain ViT, everything trainable. peft:
    PEFT's LoRA / DoRA layers instead of ours."""
    torch.manual_seed(cfg.seed)
    model = VisionTransformer(**size)
    if peft:
        peft_adapt(model, cfg.targets.split(","), variant, cfg).head.requires_grad_(True)
    elif variant is not None:
        inject_lora(model, cfg.targets.split(","), cfg.r, cfg.alpha, variant=variant)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B, std=0.02)
        with contextlib.redirect_stdout(io.StringIO()):  # the bench prints only its own lines
            mark_only_lora_as_trainable(model, also=("head",))
    return model.to(device)


def use_peft(cfg: Config) -> bool:
    return cfg.peft and importlib.util.find_spec("peft") is not None


def peft_adapt(model: nn.Module, targets, variant: str, cfg: Config) -> nn.Module:
    """PEFT's LoRA (or DoRA) layers injected into `model` in place on the nn.Linear layers that
    inject_lora would adapt, B initialised as ours, only the adapters trainable; returns model."""
    from peft import LoraConfig, inject_adapter_in_model  # optional: only with cfg.peft
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)  # PEFT's suffixes
             and any(n == t or n.endswith("." + t) for t in targets)]  # would also take Conv2d's
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=names, use_dora=variant == "dora")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model


def batch_of(batch: int, num_classes: int, device: torch.device, seed: int):
    """A preloaded batch: only speed is measured, so random images, and no data loading in the loop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, device: torch.device) -> None:
    """One optimizer step as train_vit.py takes it (bf16 autocast on CUDA)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # bypassed adapters keep grad None: AdamW skips them


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def masked_steps(size: dict, variant: str, cfg: Config, device: torch.device):
    """An adapted ViT and step(mask): one training step on a fixed batch with block l's adapters on
    where mask[l] is true. Returns (model, x, step)."""
    model = lora_vit(size, variant, cfg, device)
    groups, opt = block_groups(model), adamw(model)
    x, y = batch_of(cfg.batch_size, model.num_classes, device, cfg.seed)

    def step(mask):
        set_mask(groups, mask)
        train_step(model, opt, x, y, device)
    return model, x, step


# The sections


def bench_coto(name: str, size: dict, variant: str, cfg: Config, device: torch.device) -> dict:
    """Section 1: the steps of a CoTo schedule against the same steps with every adapter on."""
    model, _, step = masked_steps(size, variant, cfg, device)
    depth = len(model.blocks)
    on = [True] * depth
    masks = coto_masks(depth, cfg.total_steps, cfg.schedule_points, cfg.p0, cfg.stage1_ratio, cfg.seed)
    res = alternate({"always-on": lambda i: step(on), "coto": lambda i: step(masks[i])},
                    len(masks), cfg.repeats, cfg.warmup, device)
    flops_on, *flops_coto = (vit_step_flops(model, cfg.batch_size, cfg.r, variant, m, cfg.targets)
                             for m in [on, *masks])
    saving, predicted = 1 - res["coto"]["ratio"], 1 - sum(flops_coto) / len(masks) / flops_on
    step_s = res["always-on"]["s"] / len(masks)
    return {"model": name, "depth": depth, "params": sum(p.numel() for p in model.parameters()),
            "variant": variant, "active_fraction": sum(map(sum, masks)) / (len(masks) * depth),
            "ms_on": 1e3 * step_s, "ms_coto": 1e3 * res["coto"]["s"] / len(masks),
            "images_per_s_on": cfg.batch_size / step_s, "gflop_on": flops_on / 1e9,
            "ratio": res["coto"]["ratio"], "saving": saving, "predicted_saving": predicted,
            "of_predicted": saving / predicted}


def grad_per_block(model: VisionTransformer, x) -> list:
    """Whether each block's output requires grad under the adapters' current `active` flags: it
    must not below the lowest active block, where backward then has nothing to do."""
    h, out = model.embed(x), []
    for blk in model.blocks:
        h = blk(h)
        out.append(h.requires_grad)
    return out


def bench_truncation(variant: str, cfg: Config, device: torch.device) -> list:
    """Section 2: a step with only block l's adapters on, for every l: the same adapter work each
    time, only the depth of backward changes."""
    model, x, step = masked_steps(vit_sizes(cfg)["default"], variant, cfg, device)
    masks = [[k == l for k in range(len(model.blocks))] for l in range(len(model.blocks))]
    res = alternate({l: lambda i, m=m: step(m) for l, m in enumerate(masks)}, 2, 2 * cfg.repeats,
                    cfg.warmup, device)
    flops = [vit_step_flops(model, cfg.batch_size, cfg.r, variant, m, cfg.targets) for m in masks]
    rows = []
    for l, m in enumerate(masks):
        set_mask(block_groups(model), m)
        rows.append({"variant": variant, "lowest": l, "ms": 1e3 * res[l]["s"] / 2, "ratio": res[l]["ratio"],
                     "predicted": flops[l] / flops[0], "no_grad_below": not any(grad_per_block(model, x)[:l])})
    return rows


def bench_layer(cfg: Config, device: torch.device) -> list:
    """Section 3a, the layer race: one adapted layer (cfg.layer_shape) forward + backward vs its
    frozen nn.Linear, the input requiring grad as inside a network; the classroom layer (lora.py)
    beside the hand-written kernels (lab/kernels.py, "fast") and PEFT's, in the dtype training uses
    on this device (fp32 on a CPU, bf16 autocast on CUDA) and, on CUDA, in fp32 too."""
    T, D, H = ints(cfg.layer_shape)
    torch.manual_seed(cfg.seed)
    base = nn.Linear(D, H).requires_grad_(False).to(device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    dy = torch.randn(T, H, device=device)  # the gradient arriving from above
    dy_amp = dy.bfloat16()
    layers = {"nn.Linear": base}
    for v in cfg.variants.split(","):
        layers[v] = LoRALinear(copy.deepcopy(base), cfg.r, cfg.alpha, variant=v)
        nn.init.normal_(layers[v].lora_B, std=0.02)
    for v in cfg.variants.split(","):  # the same adapters, run by the hand-written kernels
        layers[f"fast {v}"] = copy.deepcopy(layers[v])
        layers[f"fast {v}"].__class__ = FastLoRALinear
    if use_peft(cfg):
        for v in ("lora", "dora"):
            layers[f"PEFT {v}"] = peft_adapt(nn.Sequential(copy.deepcopy(base)), ["0"], v, cfg)[0]

    def run(layer, amp):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = layer(x)
        y.backward(dy_amp if amp else dy)  # backward takes the output's dtype
        x.grad = None
        layer.zero_grad(set_to_none=True)

    f0 = linear_flops(T, D, H, cfg.r, "lora", False, True)
    rows = []
    for dtype in ("bf16 autocast", "fp32") if device.type == "cuda" else ("fp32",):
        res = alternate({k: lambda i, m=m: run(m, dtype != "fp32") for k, m in layers.items()}, 10,
                        3 * cfg.repeats, cfg.warmup, device)  # sums of 10 calls: steadier
        rows += [{"layer": k, "dtype": dtype, "ms": 1e3 * res[k]["s"] / 10, "ratio": res[k]["ratio"],
                  "flop_ratio": linear_flops(T, D, H, cfg.r, k.split()[-1], k != "nn.Linear", True,
                                             fast=k.startswith("fast")) / f0}
                 for k in layers]
    return rows


def bench_merged(cfg: Config, device: torch.device) -> list:
    """Section 3b: inference of the merged LoRA model, and of the unmerged one, vs the base ViT; a
    copy of the base shows how far two identical cases differ here (the noise floor)."""
    base, unmerged = (lora_vit(vit_sizes(cfg)["default"], v, cfg, device).eval() for v in (None, "lora"))
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    x, _ = batch_of(4 * cfg.batch_size, base.num_classes, device, cfg.seed)
    models = {"base": base, "base, a copy (noise floor)": copy.deepcopy(base), "merged": merged,
              "unmerged": unmerged}
    with torch.inference_mode():
        res = alternate({k: lambda i, m=m: m(x) for k, m in models.items()}, 4, 2 * cfg.repeats,
                        cfg.warmup, device)
    return [{"model": k, "ms": 1e3 * v["s"] / 4, "ratio": v["ratio"]} for k, v in res.items()]


def bench_shapley(cfg: Config, device: torch.device) -> list:
    """Section 4: the table of all 2^L coalition values (one player per block): naive (a full
    forward per coalition, timed on `naive_samples` coalitions and scaled to 2^L) and games.py's
    depth-first prefix sharing."""
    rows = []
    for depth in ints(cfg.shapley_blocks):
        model = lora_vit({**vit_sizes(cfg)["default"], "depth": depth}, "lora", cfg, device).eval()
        groups = block_groups(model)
        x, y = batch_of(cfg.shapley_batch, model.num_classes, device, cfg.seed)
        n = 2 ** depth
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.naive_samples]
        naive, out = {}, {}

        def naive_run(i):
            for m in sample.tolist():
                with games.coalition(groups, [l for l in range(depth) if m >> l & 1]):
                    naive[m] = games.score(model, x, y, value="neg_loss")

        cases = {"naive": naive_run,
                 "prefix": lambda i: out.update(prefix=games.coalition_values(
                     model.embed, model.blocks, model.forward_head, x, y, value="neg_loss"))}
        res = alternate(cases, 1, max(1, cfg.repeats // 3), 0, device)  # seconds each: few repeats
        prefix, evals = out["prefix"]
        diff_prefix = max(abs(prefix[m].item() - v) for m, v in naive.items())  # vs naive, float32
        scale = n / len(sample)  # the naive time is per coalition: measured on a sample, times 2^L
        rows += [{"blocks": depth, "method": "naive (n forward passes per coalition)",
                  "block_evals": depth * n, "calls": depth * n, "s": res["naive"]["s"] * scale,
                  "vs_naive": 1.0, "max_abs_diff": None},
                 {"blocks": depth, "method": "prefix sharing, depth-first (games.py)",
                  "block_evals": evals, "calls": evals, "s": res["prefix"]["s"],
                  "vs_naive": res["prefix"]["ratio"] / scale, "max_abs_diff": diff_prefix}]
    return rows


@contextlib.contextmanager
def silent_stderr():
    """Standard error closed at the file-descriptor level: the profiler's C++ side logs two lines
    ("USDT: ... profiler_start") per session, which no setting turns off."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_step_memory(model: nn.Module, opt: torch.optim.Optimizer, x, y, device: torch.device) -> int:
    """Peak bytes of tensor memory during one training step taken after a warm-up step (so the
    optimizer state exists): what lives before the step plus the step's highest transient.

    CUDA reports it (max_memory_allocated). On the CPU, the running sum of the profiler's
    allocation events (+bytes on allocation, -bytes on free) peaks at the step's transient."""
    train_step(model, opt, x, y, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, opt, x, y, device)
        return torch.cuda.max_memory_allocated()
    before = sum(t.numel() * t.element_size() for t in
                 [*model.parameters(), *model.buffers(),
                  *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))])
    with silent_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        train_step(model, opt, x, y, device)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return before + max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def bench_memory(cfg: Config, device: torch.device) -> list:
    """Section 5: peak memory of one training step, full fine-tuning vs each adapter variant (and
    PEFT's LoRA and DoRA)."""
    rows = []
    peft = [f"PEFT {v}" for v in ("lora", "dora") if use_peft(cfg)]
    for name, size in vit_sizes(cfg).items():
        for method in ("full", *cfg.variants.split(","), *peft):
            variant = None if method == "full" else method.split()[-1]
            model = lora_vit(size, variant, cfg, device, peft=method.startswith("PEFT"))
            x, y = batch_of(cfg.batch_size, model.num_classes, device, cfg.seed)
            rows.append({"model": name, "method": method,
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "peak_mb": peak_step_memory(model, adamw(model), x, y, device) / 2 ** 20})
    return rows


# The table


def table(res: dict) -> str:
    """The tables of the sections that ran, as markdown."""
    cfg = res["config"]
    threads = f"{res['threads']} thread" + ("s" if res["threads"] != 1 else "")
    L = [f"bench.py on {res['device']} ({threads}), torch {torch.__version__}, "
         f"batch {cfg['batch_size']}, r {cfg['r']}, targets {cfg['targets'].replace(',', '/')}"]
    if res.get("coto"):
        L += ["", "1. Training step over a CoTo schedule (p0 %g, %d steps evenly spaced over it) vs "
                  "always-on adapters; saving = 1 - time ratio" % (cfg["p0"], cfg["schedule_points"]), "",
              "| model | variant | ms/step on | img/s on | active | CoTo / on | saving | predicted (FLOPs) | of predicted |",
              "|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {r['model']} ({r['depth']} blocks, {r['params'] / 1e6:.1f}M) | {r['variant']} | "
              f"{r['ms_on']:.1f} | {r['images_per_s_on']:.0f} | {r['active_fraction']:.0%} | "
              f"{r['ratio']:.3f} | {r['saving']:.1%} | {r['predicted_saving']:.1%} | {r['of_predicted']:.0%} |"
              for r in res["coto"]]
    if res.get("truncation"):
        L += ["", "2. Backward truncation: only block l's adapters on (default ViT)", "",
              "| variant | lowest active block | ms/step | vs l=0 | predicted (FLOPs) | nothing below requires grad |",
              "|---|---|---|---|---|---|"]
        L += [f"| {r['variant']} | {r['lowest']} | {r['ms']:.1f} | {r['ratio']:.3f} | {r['predicted']:.3f} | "
              f"{'yes' if r['no_grad_below'] else 'NO'} |" for r in res["truncation"]]
    T, D, H = ints(cfg["layer_shape"])
    L += ["", f"3. The layer race: one layer, {T} tokens, {D} -> {H}, forward + backward, input requiring "
              f"grad; lora / dora / hira: lora.py (classroom), fast: lab/kernels.py, PEFT: peft's layers", "",
          "| layer | dtype | ms | vs nn.Linear | FLOP ratio |", "|---|---|---|---|---|"]
    L += [f"| {r['layer']} | {r['dtype']} | {r['ms']:.2f} | {r['ratio']:.2f} | {r['flop_ratio']:.2f} |"
          for r in res["layer"]]
    if res.get("merged"):
        L += ["", f"   Inference of the default ViT, batch {4 * cfg['batch_size']}, no grad", "",
              "| model | ms | vs base |", "|---|---|---|"]
        L += [f"| {r['model']} | {r['ms']:.2f} | {r['ratio']:.3f} |" for r in res["merged"]]
    if res.get("shapley"):
        L += ["", f"4. Exact Shapley: all 2^L coalition values of block adapters, {cfg['shapley_batch']} "
                  "images (naive time: measured per coalition x 2^L)", "",
              "| blocks | method | block evaluations | calls | s | vs naive | max abs diff to the row above |",
              "|---|---|---|---|---|---|---|"]
        for r in res["shapley"]:
            diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            L.append(f"| {r['blocks']} | {r['method']} | {r['block_evals']:,} | {r['calls']:,} | "
                     f"{r['s']:.2f} | {r['vs_naive']:.3f} | {diff} |")
    if res.get("memory"):
        L += ["", "5. Peak memory of one training step (AdamW)", "",
              "| model | method | trainable params | peak MB | vs full |", "|---|---|---|---|---|"]
        full = {r["model"]: r["peak_mb"] for r in res["memory"] if r["method"] == "full"}
        L += [f"| {r['model']} | {r['method']} | {r['trainable']:,} | {r['peak_mb']:.1f} | "
              f"{r['peak_mb'] / full[r['model']]:.2f} |" for r in res["memory"]]
    return "\n".join(L)


def main(cfg: Config) -> dict:
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    res = {"config": dataclasses.asdict(cfg), "device": device.type, "threads": torch.get_num_threads()}
    print(f"bench.py on {device.type}, {res['threads']} thread{'s' * (res['threads'] > 1)}; "
          f"bench.json and bench.md go to {cfg.out}", flush=True)
    t0 = time.perf_counter()

    def log(line):
        print(f"{line} | {format_eta(time.perf_counter() - t0)} elapsed", flush=True)

    if not cfg.layer_only:
        res["coto"] = []
        for name, size in vit_sizes(cfg).items():
            for variant in cfg.variants.split(","):
                r = bench_coto(name, size, variant, cfg, device)
                res["coto"].append(r)
                log(f"coto {name} {variant} | {r['ms_on']:.0f} ms/step on | saving {r['saving']:.1%} "
                    f"| predicted {r['predicted_saving']:.1%}")
        res["truncation"] = [row for v in ("lora", "hira") if v in cfg.variants.split(",")
                             for row in bench_truncation(v, cfg, device)]
        log("truncation")
    res["layer"] = bench_layer(cfg, device)
    log("layer race")
    if not cfg.layer_only:
        res["merged"] = bench_merged(cfg, device)
        res["shapley"] = bench_shapley(cfg, device)
        log("merged inference, shapley")
        res["memory"] = bench_memory(cfg, device)
        log("memory")
    res["table"] = table(res)
    print("\n" + res["table"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(res, indent=1))
    atomic_write_text(out / "bench.md", res["table"] + "\n")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({format_eta(time.perf_counter() - t0)} in all)")
    return res


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, interrupted="nothing was written; run it again",
               example="OMP_NUM_THREADS=1 python -m lab.bench --quick --variants lora,dora --out runs/bench-quick")
