"""CoTo (Zhuang et al., "Come Together, But Not Right Now", ICML 2025, arXiv 2506.05713, Fig. 1):
before every optimizer step each transformer block's adapters are switched on together with
probability p(t), rising from p0 to 1 over the first 75 % of the steps, then plain LoRA. CoTo writes
the draw on each adapter layer (a module with a boolean `active`, e.g. lora.LoRALinear) as `coto_on`,
which its forward honours in training mode only: bypassed, no compute, grad None.

    coto = CoTo(block_groups(model), total_steps, p0=0.0, seed=0)
    for step in range(total_steps):
        lr = get_lr(step); coto.step(step)   # one draw per optimizer step, beside the LR update
        model.train(); model(x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
"""
import math
import numbers
import operator

import torch

RAMPS = {  # progress u in [0, 1) through stage 1 -> fraction of the way from p0 to 1
    "linear": lambda u: u,  # the paper's
    "exp": lambda u: math.expm1(5.0 * u) / math.expm1(5.0),  # starts slower
    "sine": lambda u: math.sin(0.5 * math.pi * u),  # starts faster
    "constant": lambda u: 0.0,  # p0 through stage 1; stage1_ratio=1: layer drop at rate 1 - p0
}
SHAPES = tuple(RAMPS)


def coto_prob(step, total_steps, p0=0.0, stage1_ratio=0.75, shape="linear") -> float:
    """p(t) = min(p0 + (1 - p0) * t / ceil(stage1_ratio * T), 1) for the linear shape; every
    shape starts at p0 and reaches exactly 1 at step ceil(stage1_ratio * T)."""
    for name, value, low in (("step", step, 0), ("total_steps", total_steps, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")  # numpy ints welcome
    if not (0.0 <= p0 <= 1.0 and 0.0 <= stage1_ratio <= 1.0):  # p0 a probability; stage1_ratio 0: plain LoRA
        raise ValueError(f"p0={p0} and stage1_ratio={stage1_ratio} must both be in [0, 1]")
    if shape not in RAMPS:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    ramp = math.ceil(stage1_ratio * total_steps)
    return 1.0 if step >= ramp else p0 + (1.0 - p0) * RAMPS[shape](step / ramp)


def block_of(name: str) -> str:
    """A layer's block: its path up to the last index ("3", "encoder_layer_3") above the layer itself
    (else its own): timm blocks.3.attn.qkv, GPT-2 transformer.h.3.mlp.c_fc, LLaMA model.layers.3.q_proj,
    torchvision encoder.layers.encoder_layer_3.mlp.0, Swin layers.0.blocks.3.attn.qkv: up to "3"."""
    parts = name.split(".")
    for i in [*reversed(range(len(parts) - 1)), len(parts) - 1]:  # parents inside out, then the layer ("mlp.0")
        if parts[i].rpartition("_")[2].isdigit():
            return ".".join(parts[:i + 1])
    raise ValueError(f"no index in {name!r} to tell its block: pass block_groups group_of=callable(name) -> group")


def block_groups(model: torch.nn.Module, group_of=block_of) -> dict:
    """{group name: [adapter layer, ...]} in module order, one CoTo draw per group; print(CoTo(...)) counts them."""
    groups = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "active", None), bool):
            groups.setdefault(group_of(name), []).append(module)
    if not groups:
        raise ValueError("the model has no adapter layers (modules with a boolean `active` flag, such "
                         "as lora.LoRALinear): add adapters first (lora.inject_lora)")
    return groups


class CoTo:
    """Draws which groups train at each optimizer step; step() writes it on their layers as `coto_on`.
    A new CoTo takes its layers over: a copy.deepcopy of a model keeps the last draw until its own CoTo
    steps or is removed."""

    def __init__(self, groups: dict, total_steps, p0=0.0, stage1_ratio=0.75, shape="linear", seed=0):
        coto_prob(0, total_steps, p0, stage1_ratio, shape)  # checks the arguments
        layers = [layer for group in groups.values() for layer in group]
        if not groups or not all(isinstance(getattr(layer, "active", None), bool) for layer in layers):
            raise TypeError("groups must be a non-empty dict {group name: [adapter layer, ...]}, an adapter "
                            "layer being a module with a boolean `active`: build it with block_groups(model)")
        if len({id(layer) for layer in layers}) < len(layers):
            raise ValueError("a layer is in two groups: each layer belongs to one group")
        self.groups, self.layers = groups, layers
        self.total_steps, self.p0, self.stage1_ratio, self.shape = int(total_steps), p0, stage1_ratio, shape
        # its own generator: CoTo changes neither data order nor init, and DDP ranks draw alike
        self.generator = torch.Generator().manual_seed(operator.index(seed))
        self.p, self.mask = 1.0, torch.ones(len(groups), dtype=torch.bool)
        self._write([None] * len(groups))  # attached, not stepped: a training forward raises until step()

    def __repr__(self):  # how many groups formed: a mis-grouping shows at once
        names, kw = list(self.groups), f"total_steps={self.total_steps}, p0={self.p0}, shape={self.shape!r}"
        return f"CoTo({len(names)} groups, {len(self.layers)} layers: {names[0]} .. {names[-1]}; {kw})"

    def _write(self, flags) -> None:
        for flag, group in zip(flags, self.groups.values()):
            for layer in group:  # an empty group is drawn too, and switches nothing
                layer.coto_on = flag

    def step(self, step) -> torch.Tensor:
        """Draw step `step`'s mask (n_groups,): group i trains iff mask[i], until the next step()."""
        self.p = coto_prob(step, self.total_steps, self.p0, self.stage1_ratio, self.shape)
        mask = torch.rand(len(self.groups), generator=self.generator) < self.p  # in [0, 1): p = 1 keeps all
        if not mask.any():  # one group chosen uniformly; a redraw loop could spin for long at p0 = 0
            mask[torch.randint(len(mask), (1,), generator=self.generator)] = True
        self.mask = mask
        self._write(mask.tolist())
        return mask

    def remove(self) -> None:
        self._write([True] * len(self.groups))  # CoTo off: every adapter trains again (idempotent)

    def state_dict(self) -> dict:
        return dict(generator=self.generator.get_state(), p=self.p, mask=self.mask.clone(), names=list(self.groups),
                    total_steps=self.total_steps, p0=self.p0, stage1_ratio=self.stage1_ratio, shape=self.shape)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, its mask in force at once; a state of another run is refused."""
        mine = self.state_dict()
        for key in mine:
            if key not in state:
                raise ValueError(f"CoTo state lacks {key}: pass the dict CoTo.state_dict() returned")
            if key in ("names", "total_steps", "p0", "stage1_ratio", "shape") and state[key] != mine[key]:
                raise ValueError(f"CoTo state is for another run: {key} is {state[key]!r} in it, {mine[key]!r} here")
        self.generator.set_state(state["generator"])
        self.p, self.mask = state["p"], state["mask"].clone()
        self._write(self.mask.tolist())
