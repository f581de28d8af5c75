"""CoTo on HF PEFT's own LoRA / DoRA layers, and a callback for transformers' Trainer.

coto.CoTo drives any module with a boolean `active` whose forward honours `coto_on` in training
mode. PEFT's layers read neither flag, so `peft_block_groups` gives each PEFT LoRA layer both flags
and a pair of forward hooks that honour them through PEFT's public per-layer switch
(`enable_adapters`); coto.CoTo then drives them unchanged:

    groups = peft_block_groups(model)                          # one group per transformer block
    coto = CoTo(groups, total_steps)                           # your own loop: coto.step(step) per step
    trainer = Trainer(..., callbacks=[CoToCallback(groups)])   # or transformers' Trainer

No import of peft or transformers: layers and Trainer events are duck-typed.
"""
from coto import CoTo, block_groups, block_of


def is_peft_lora(module) -> bool:
    """A PEFT LoRA / DoRA layer (not a modules_to_save copy, which PEFT trains in full)."""
    return "lora_A" in getattr(module, "adapter_layer_names", ())


def switch(layer, on: bool) -> None:
    """PEFT's switch, every requires_grad flag put back: enable_adapters(False) also freezes the
    adapter, and an optimizer built before training must keep seeing the same parameters (and
    weights a user froze stay frozen)."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.enable_adapters(on)
    for p, flag in flags:
        p.requires_grad_(flag)


def _bypass(layer, args) -> None:
    """Forward pre-hook: switch the layer off for this forward pass if its `active` flag (any mode)
    or CoTo's draw (training mode) says so."""
    if layer.training and layer.coto_on is None:
        raise RuntimeError("a CoTo drives this adapter but has not drawn yet: call coto.step(step) "
                           "before each optimizer step (or model.eval() to evaluate)")
    if (not layer.active or (layer.training and not layer.coto_on)) and not layer.disable_adapters:
        if layer.merged:
            raise RuntimeError(f"cannot switch off a merged adapter ({type(layer).__name__}): its update "
                               f"is inside the base weight; call PEFT's unmerge_adapter() first")
        switch(layer, False)
        layer.coto_switched_off = True


def _restore(layer, args, output) -> None:
    """Forward hook, run also after a forward pass that raised: switch on what _bypass switched off."""
    if layer.coto_switched_off:
        switch(layer, True)
        layer.coto_switched_off = False


def check_enabled(layers) -> None:
    """Refuse a PEFT model whose adapters are all disabled: CoTo would train none of them."""
    peft = [layer for layer in layers if is_peft_lora(layer)]
    if peft and all(layer.disable_adapters for layer in peft):
        raise ValueError("every PEFT adapter of this model is disabled (disable_adapter_layers()), so "
                         "training would change none: call model.enable_adapter_layers() first")


def peft_block_groups(model, group_of=block_of) -> dict:
    """coto.block_groups for a PEFT model: {block: [PEFT LoRA layer, ...]}, each layer given the
    `active` / `coto_on` flags and the hooks that honour them (once; calling it again is harmless)."""
    layers = [module for module in model.modules() if is_peft_lora(module)]
    if not layers:
        raise ValueError("the model has no PEFT LoRA layers: wrap it with peft.get_peft_model first")
    check_enabled(layers)
    for layer in layers:
        if not hasattr(layer, "coto_switched_off"):
            layer.active, layer.coto_on, layer.coto_switched_off = True, True, False
            layer.register_forward_pre_hook(_bypass)
            layer.register_forward_hook(_restore, always_call=True)
    return block_groups(model, group_of)


class CoToCallback:
    """CoTo in transformers' Trainer: `Trainer(..., callbacks=[CoToCallback(peft_block_groups(model))])`.

    on_train_begin builds the CoTo for `state.max_steps` optimizer steps (resuming, it replays the
    draws made before the checkpoint, so the masks equal an uninterrupted run's); on_step_begin runs
    once per optimizer step, so all gradient-accumulation micro-batches share a draw; on_train_end
    takes CoTo off. Evaluation runs in eval mode: every adapter on. Every other Trainer event
    on_<event>(args, state, control, **kwargs) is a no-op."""

    def __init__(self, groups: dict, p0=0.0, stage1_ratio=0.75, shape="linear", seed=0):
        CoTo(groups, 1, p0, stage1_ratio, shape, seed).remove()  # checks now rather than when training starts
        self.groups, self.options = groups, dict(p0=p0, stage1_ratio=stage1_ratio, shape=shape, seed=seed)
        self.coto = None

    def on_train_begin(self, args, state, control, **kwargs):
        check_enabled([layer for group in self.groups.values() for layer in group])
        self.coto = CoTo(self.groups, state.max_steps, **self.options)  # takes over from an earlier train()
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
