"""CoTo: "Come Together, But Not Right Now" (Zhuang et al., ICML 2025, arXiv 2506.05713).

Before every optimizer step, each transformer block's LoRA adapters are switched on together with
probability p(t), which rises from p0 to 1 over the first `stage1_ratio` of training (stage 1);
the rest is plain LoRA (stage 2). A switched-off adapter is bypassed (LoRALinear.active = False):
no compute, no gradient, no AdamW update. Evaluation always uses every adapter.

    coto = CoTo(block_groups(model), total_steps, p0=0.0, seed=0)
    for step in range(total_steps):
        lr = get_lr(step); coto.step(step)     # one draw per optimizer step
        loss = model(x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        with coto.all_active():
            evaluate(model)
"""
import math
from contextlib import contextmanager

import torch

from lora import lora_layers

SHAPES = ("linear", "exp", "sine", "constant")


def coto_prob(step: int, total_steps: int, p0: float = 0.0, stage1_ratio: float = 0.75,
              shape: str = "linear") -> float:
    """Activation probability at optimizer step `step` (method.md section 2):
    linear: p(t) = min(p0 + (1 - p0) * t / ceil(stage1_ratio * T), 1). "exp" starts slower,
    "sine" faster; all three reach exactly 1 at step ceil(stage1_ratio * T) and stay there.
    "constant" keeps p = p0 through stage 1: with stage1_ratio = 1 it is the constant-rate layer
    drop baseline ("stochastic depth for LoRA", method.md section 4)."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be a positive integer")
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"p0={p0} is a probability: it must be in [0, 1]")
    if not 0.0 <= stage1_ratio <= 1.0:
        raise ValueError(f"stage1_ratio={stage1_ratio} must be in [0, 1] (0 = plain LoRA)")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    ramp = math.ceil(stage1_ratio * total_steps)
    if step >= ramp:
        return 1.0
    u = step / ramp  # progress through stage 1, in [0, 1)
    if shape == "exp":
        u = math.expm1(5.0 * u) / math.expm1(5.0)
    elif shape == "sine":
        u = math.sin(0.5 * math.pi * u)
    elif shape == "constant":
        u = 0.0
    return p0 + (1.0 - p0) * u


def block_of(name: str) -> str:
    """The grouping rule: a layer belongs to the block named by its path up to and including the
    first integer component ("blocks.3.attn.qkv" -> "blocks.3", "transformer.h.5.mlp.c_fc" ->
    "transformer.h.5")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    raise ValueError(f"cannot tell the block of layer {name!r} (no integer component in its name); "
                     f"pass group_of=callable(name) -> group name to block_groups")


def block_groups(model: torch.nn.Module, group_of=block_of) -> dict:
    """{group name: [LoRALinear, ...]} in module order: one CoTo draw per group.
    `group_of(name) -> str` overrides the rule (e.g. `lambda name: name` for one draw per module)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call lora.inject_lora(model, ...) first")
    groups = {}
    for name, layer in layers.items():
        groups.setdefault(group_of(name), []).append(layer)
    return groups


def set_active(groups: dict, mask) -> None:
    """Switch the adapters of group i on or off according to mask[i]."""
    if len(mask) != len(groups):
        raise ValueError(f"mask has {len(mask)} entries for {len(groups)} groups")
    for on, layers in zip(mask, groups.values()):
        for layer in layers:
            layer.active = bool(on)


@contextmanager
def active_mask(groups: dict, mask):
    """Temporarily set the adapters' `active` flags from `mask` (one entry per group); the previous
    flags of every layer come back afterwards, also on an exception."""
    before = [(layer, layer.active) for layers in groups.values() for layer in layers]
    set_active(groups, mask)
    try:
        yield
    finally:
        for layer, on in before:
            layer.active = on


class CoTo:
    """Draws CoTo's per-block mask before every optimizer step and applies it.

    The draw uses its own seeded torch.Generator, so turning CoTo on changes neither the data
    order nor the initialisation against plain LoRA, and every DDP rank draws the same mask.
    If no group is drawn, one group chosen uniformly at random is switched on (no rejection loop:
    with p0 = 0 that could spin for a very long time)."""

    def __init__(self, groups: dict, total_steps: int, p0: float = 0.0, stage1_ratio: float = 0.75,
                 shape: str = "linear", seed: int = 0):
        if not groups:
            raise ValueError("CoTo needs at least one group of adapters (see block_groups)")
        coto_prob(0, total_steps, p0, stage1_ratio, shape)  # validates the arguments
        self.groups, self.names = groups, list(groups)
        self.total_steps, self.p0, self.stage1_ratio, self.shape = total_steps, p0, stage1_ratio, shape
        self.generator = torch.Generator().manual_seed(seed)
        self.p = 1.0
        self.mask = torch.ones(len(groups), dtype=torch.bool)

    def step(self, step: int) -> torch.Tensor:
        """Draw and apply the mask for optimizer step `step`; returns it, (n_groups,) bool."""
        self.p = coto_prob(step, self.total_steps, self.p0, self.stage1_ratio, self.shape)
        n = len(self.names)
        mask = torch.rand(n, generator=self.generator) < self.p  # rand is in [0, 1): p = 1 keeps all
        if not mask.any():
            mask[torch.randint(n, (1,), generator=self.generator)] = True
        self.mask = mask
        set_active(self.groups, mask)
        return mask

    def all_active(self):
        """Context manager for evaluation: every adapter on, the training mask restored after."""
        return active_mask(self.groups, [True] * len(self.names))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "p": self.p, "mask": self.mask.clone(),
                "names": self.names, "total_steps": self.total_steps, "p0": self.p0,
                "stage1_ratio": self.stage1_ratio, "shape": self.shape}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("names", "total_steps", "p0", "stage1_ratio", "shape"):
            if state[key] != mine[key]:
                raise ValueError(f"CoTo state is for another run: {key} is {state[key]!r} in the "
                                 f"state but {mine[key]!r} here")
        self.generator.set_state(state["generator"])
        self.p, self.mask = state["p"], state["mask"].clone()
        set_active(self.groups, self.mask)
