"""CoTo: "Come Together, But Not Right Now" (Zhuang et al., ICML 2025, arXiv 2506.05713).

Before every optimizer step, each transformer block's adapters are switched on together with
probability p(t), which rises from p0 to 1 over the first `stage1_ratio` of training (stage 1);
the rest is plain LoRA (stage 2). A switched-off adapter is bypassed: no compute, no gradient
(grad None), no AdamW update. The mask acts only on forward passes in training mode: in eval mode
every adapter runs, so evaluation needs nothing but the usual `model.eval()`.

    coto = CoTo(block_groups(model), total_steps, p0=0.0, seed=0)
    for step in range(total_steps):
        lr = get_lr(step); coto.step(step)     # one draw per optimizer step
        model.train(); loss = model(x).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        model.eval(); evaluate(model)          # every adapter on

An adapter layer is any module with a boolean `active` flag (lora.LoRALinear) or a PEFT LoRA
layer (switched through its public `enable_adapters`); coto.py imports neither lora.py nor PEFT.
With transformers' Trainer: `Trainer(..., callbacks=[CoToCallback(block_groups(model))])`.
"""
import math
from contextlib import contextmanager

import torch

RAMPS = {  # progress u in [0, 1) through stage 1 -> fraction of the way from p0 to 1
    "linear": lambda u: u,
    "exp": lambda u: math.expm1(5.0 * u) / math.expm1(5.0),  # starts slower
    "sine": lambda u: math.sin(0.5 * math.pi * u),  # starts faster
    "constant": lambda u: 0.0,  # p0 through stage 1
}
SHAPES = tuple(RAMPS)


def coto_prob(step: int, total_steps: int, p0: float = 0.0, stage1_ratio: float = 0.75,
              shape: str = "linear") -> float:
    """Activation probability at optimizer step `step` (method.md section 2):
    linear: p(t) = min(p0 + (1 - p0) * t / ceil(stage1_ratio * T), 1); every shape reaches exactly
    1 at step ceil(stage1_ratio * T) and stays there. "constant" with stage1_ratio = 1 is the
    constant-rate layer drop baseline ("stochastic depth for LoRA", method.md section 4)."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be a positive integer")
    for name, value, rule in (("p0", p0, "is a probability: it must be in [0, 1]"),
                              ("stage1_ratio", stage1_ratio, "must be in [0, 1] (0 = plain LoRA)")):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} {rule}")
    if shape not in RAMPS:
        raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0 (the optimizer step)")
    ramp = math.ceil(stage1_ratio * total_steps)
    return 1.0 if step >= ramp else p0 + (1.0 - p0) * RAMPS[shape](step / ramp)


# ---------------------------------------------------------------------------------------------
# Adapter layers: the one on/off switch CoTo needs, for this project's layers and for PEFT's


def is_adapter_layer(module) -> bool:
    """A module with a boolean `active` flag (lora.LoRALinear), or a PEFT LoRA / DoRA layer."""
    return isinstance(getattr(module, "active", None), bool) or \
        "lora_A" in getattr(module, "adapter_layer_names", ())


def is_on(layer) -> bool:
    return layer.active if isinstance(getattr(layer, "active", None), bool) else not layer.disable_adapters


def switch(layer, on: bool) -> None:
    """Turn one adapter layer on or off. Off means bypassed: the layer returns its base layer's
    output and its adapter parameters get no gradient (grad None)."""
    if not on and getattr(layer, "merged", False):
        raise RuntimeError(f"cannot switch off a merged adapter ({type(layer).__name__}): its update "
                           f"is inside the base weight; unmerge first (lora.unmerge_lora, or PEFT's "
                           f"unmerge_adapter)")
    if hasattr(layer, "coto_bypassed"):  # driven by CoTo: an explicit switch wins over CoTo's
        layer.coto_bypassed = False
    if isinstance(getattr(layer, "active", None), bool):
        layer.active = on
        return
    # PEFT's public switch also sets requires_grad on the adapter's parameters (False when off,
    # True for the active adapter when on). Put every flag back: an optimizer built from the
    # parameters that require grad then always sees the same set, and weights a user froze stay frozen.
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.enable_adapters(on)
    for p, flag in flags:
        p.requires_grad_(flag)


def block_of(name: str) -> str:
    """The grouping rule: a layer belongs to the block named by its path up to and including the
    first integer component ("blocks.3.attn.qkv" -> "blocks.3", "transformer.h.5.mlp.c_fc" ->
    "transformer.h.5", PEFT's "base_model.model.model.layers.3.self_attn.q_proj" ->
    "base_model.model.model.layers.3")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    raise ValueError(f"cannot tell the block of layer {name!r} (no integer component in its name); "
                     f"pass group_of=callable(name) -> group name to block_groups")


def block_groups(model: torch.nn.Module, group_of=block_of) -> dict:
    """{group name: [adapter layer, ...]} in module order: one CoTo draw per group.
    `group_of(name) -> str` overrides the rule (e.g. `lambda name: name` for one draw per module)."""
    layers = {name: m for name, m in model.named_modules() if is_adapter_layer(m)}
    if not layers:
        raise ValueError("the model has no adapter layers (modules with a boolean `active` flag, such as "
                         "lora.LoRALinear, or PEFT LoRA layers): add adapters first (lora.inject_lora "
                         "or peft.get_peft_model)")
    groups = {}
    for name, layer in layers.items():
        groups.setdefault(group_of(name), []).append(layer)
    return groups


def check_groups(groups) -> None:
    """groups must be {group name: [adapter layer, ...]} with every layer in one group only."""
    if not isinstance(groups, dict):
        raise TypeError(f"groups must be a dict {{group name: [adapter layers]}}, got a "
                        f"{type(groups).__name__}: build it with block_groups(model)")
    seen = set()
    for name, layers in groups.items():
        if not isinstance(layers, (list, tuple)):
            raise TypeError(f"groups[{name!r}] must be a list of adapter layers, got a "
                            f"{type(layers).__name__}: build groups with block_groups(model) "
                            f"(group_of=lambda name: name for one group per layer)")
        for layer in layers:
            if not is_adapter_layer(layer):
                raise TypeError(f"groups[{name!r}] holds a {type(layer).__name__}, which is not an adapter "
                                f"layer (a module with a boolean `active` flag, or a PEFT LoRA layer): "
                                f"build groups with block_groups(model)")
            if id(layer) in seen:
                raise ValueError(f"groups[{name!r}] repeats a layer that is already in another group: "
                                 f"each layer belongs to one group")
            seen.add(id(layer))


def set_active(groups: dict, mask) -> None:
    """Switch the adapters of group i on or off according to mask[i]: an explicit switch (for
    analyses) that holds in training and in eval mode until switched again."""
    check_groups(groups)
    if len(mask) != len(groups):
        raise ValueError(f"mask has {len(mask)} entries for {len(groups)} groups")
    for on, layers in zip(mask, groups.values()):
        for layer in layers:
            switch(layer, bool(on))


@contextmanager
def active_mask(groups: dict, mask):
    """Temporarily set the adapters' switches from `mask` (one entry per group); the previous
    switch of every layer comes back afterwards, also on an exception."""
    check_groups(groups)
    before = [(layer, is_on(layer)) for layers in groups.values() for layer in layers]
    set_active(groups, mask)
    try:
        yield
    finally:
        for layer, on in before:
            switch(layer, on)


def _bypass(layer, args) -> None:
    """Forward pre-hook CoTo puts on each adapter layer: in training mode, switch the layer off if
    its group is masked this step (`layer.coto_on`, written by CoTo.step)."""
    if layer.coto_bypassed:  # the last forward raised before _restore ran: undo its switch first
        _restore(layer, args, None)
    if not layer.training:
        return
    if layer.coto_on is None:
        raise RuntimeError("a training-mode forward pass reached a CoTo adapter before any "
                           "coto.step(step): call coto.step(step) before each optimizer step "
                           "(or model.eval() to evaluate)")
    if not layer.coto_on and is_on(layer):
        switch(layer, False)
        layer.coto_bypassed = True


def _restore(layer, args, output) -> None:
    """Forward hook: switch back on what _bypass switched off."""
    if layer.coto_bypassed:
        switch(layer, True)
        layer.coto_bypassed = False


class CoTo:
    """Draws CoTo's per-block mask before every optimizer step; the mask acts on every forward
    pass in training mode until the next draw, and on none in eval mode.

    Two hooks on each layer switch a layer of a masked group off for its training-mode forward pass
    and back on after it (after a forward that raised: at its next forward pass or explicit switch),
    so explicit switches (set_active, active_mask) are never overwritten; `remove()` takes the hooks
    off. The hooks read plain bools on the layer (`training`, `coto_on`: its group's draw,
    `coto_bypassed`), so a compiled block guards on their values, as it does on `active`, and all
    blocks share one compiled graph per combination.

    The draw uses its own seeded torch.Generator, so turning CoTo on changes neither the data
    order nor the initialisation against plain LoRA, and every DDP rank draws the same mask.
    If no group is drawn, one chosen uniformly at random is switched on (a rejection loop could spin
    for a very long time with p0 = 0). An empty group is drawn and switches nothing."""

    def __init__(self, groups: dict, total_steps: int, p0: float = 0.0, stage1_ratio: float = 0.75,
                 shape: str = "linear", seed: int = 0):
        check_groups(groups)
        if not groups:
            raise ValueError("CoTo needs at least one group of adapters (see block_groups)")
        coto_prob(0, total_steps, p0, stage1_ratio, shape)  # validates the arguments
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed={seed!r} must be an integer")
        self.groups, self.layers = groups, [layer for group in groups.values() for layer in group]
        if any(hasattr(layer, "coto_on") for layer in self.layers):
            raise ValueError("these adapter layers are already driven by another CoTo: call its remove() "
                             "first (one CoTo per model)")
        self.total_steps, self.p0, self.stage1_ratio, self.shape = total_steps, p0, stage1_ratio, shape
        self.generator = torch.Generator().manual_seed(seed)
        self.p = 1.0
        self.mask = torch.ones(len(groups), dtype=torch.bool)
        self._handles = []
        for layer in self.layers:
            layer.coto_on, layer.coto_bypassed = None, False  # None: not stepped yet
            self._handles += [layer.register_forward_pre_hook(_bypass),
                              layer.register_forward_hook(_restore)]

    def _apply(self, mask: torch.Tensor) -> None:
        self.mask = mask
        for on, group in zip(mask.tolist(), self.groups.values()):
            for layer in group:
                layer.coto_on = on

    def remove(self) -> None:
        """Take CoTo off the layers: every adapter then runs in training mode too. Idempotent."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            _restore(layer, None, None)  # a forward that raised may have left it off
            del layer.coto_on, layer.coto_bypassed

    def step(self, step: int) -> torch.Tensor:
        """Draw the mask for optimizer step `step`: (n_groups,) bool, True = the group's adapters
        train. It applies to every training-mode forward pass until the next step()."""
        self.p = coto_prob(step, self.total_steps, self.p0, self.stage1_ratio, self.shape)
        n = len(self.groups)
        mask = torch.rand(n, generator=self.generator) < self.p  # rand is in [0, 1): p = 1 keeps all
        if not mask.any():
            mask[torch.randint(n, (1,), generator=self.generator)] = True
        self._apply(mask)
        return mask

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "p": self.p, "mask": self.mask.clone(),
                "names": list(self.groups), "total_steps": self.total_steps, "p0": self.p0,
                "stage1_ratio": self.stage1_ratio, "shape": self.shape}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if not isinstance(state, dict):
            raise TypeError(f"state must be the dict CoTo.state_dict() returned, got a "
                            f"{type(state).__name__}")
        missing = [key for key in mine if key not in state]
        if missing:
            raise ValueError(f"CoTo state lacks {', '.join(missing)}: pass the dict "
                             f"CoTo.state_dict() returned")
        for key in ("names", "total_steps", "p0", "stage1_ratio", "shape"):
            if state[key] != mine[key]:
                raise ValueError(f"CoTo state is for another run: {key} is {state[key]!r} in the "
                                 f"state but {mine[key]!r} here")
        self.generator.set_state(state["generator"])
        self.p = state["p"]
        self._apply(state["mask"].clone())


class CoToCallback:
    """CoTo in transformers' Trainer: `Trainer(..., callbacks=[CoToCallback(block_groups(model))])`.

    on_train_begin builds the CoTo for `state.max_steps` optimizer steps (resuming, it replays the
    draws made before the checkpoint, so the masks equal an uninterrupted run's); on_step_begin runs
    once per optimizer step and draws the mask, so all gradient-accumulation micro-batches share it;
    on_train_end takes CoTo off, so every adapter runs afterwards. Evaluation runs in eval mode: every
    adapter on. Duck-typed (coto.py imports no transformers): every other Trainer event
    on_<event>(args, state, control, **kwargs) is a no-op."""

    def __init__(self, groups: dict, p0: float = 0.0, stage1_ratio: float = 0.75, shape: str = "linear",
                 seed: int = 0):
        CoTo(groups, 1, p0, stage1_ratio, shape, seed).remove()  # validates now rather than when training starts
        self.groups, self.options = groups, dict(p0=p0, stage1_ratio=stage1_ratio, shape=shape, seed=seed)
        self.coto = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.coto is not None:  # a previous train(), perhaps stopped by an exception
            self.coto.remove()
        self.coto = CoTo(self.groups, state.max_steps, **self.options)
        for t in range(state.global_step):  # resumed from a checkpoint: replay the earlier draws
            self.coto.step(t)

    def on_step_begin(self, args, state, control, **kwargs):
        self.coto.step(state.global_step)  # global_step = optimizer steps done so far

    def on_train_end(self, args, state, control, **kwargs):
        self.coto.remove()

    def __getattr__(self, name):
        if name.startswith("on_"):  # every other Trainer event (on_log, on_evaluate, ...): nothing to do
            return lambda *args, **kwargs: None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
