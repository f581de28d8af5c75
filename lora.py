"""LoRA written by hand, with the DoRA and HiRA variants that CoTo is combined with.

LoRA (Hu et al., 2021, arXiv 2106.09685) learns a low-rank update beside a frozen nn.Linear; B = 0 at start:
    x ─┬─ W (out × in, frozen) ───────────────────────────────────────────── + ── y = W x + b + scaling * B A x
       └─ dropout ── A (r × in, kaiming-uniform) ── B (out × r, zeros) ── × scaling (alpha / r)

DoRA (arXiv 2402.09353) rescales the rows of W + scaling B A; HiRA (ICLR 2025) adds scaling * W ⊙ (B A).
`active` (yours) and `coto_on` (CoTo's draw, training mode only) switch the adapter off: exactly base(x).
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn

VARIANTS = ("lora", "dora", "hira")


def check_lora_args(base: nn.Linear, r, alpha, dropout, variant, rslora) -> None:
    """Raise, naming the argument, for anything that would make a LoRALinear silently wrong."""
    if not isinstance(base, nn.Linear):  # GPT-2's Conv1D, say, keeps W as (in, out)
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
    if nn.utils.parametrize.is_parametrized(base) or base._forward_pre_hooks:  # weight_norm, spectral_norm
        raise ValueError("cannot adapt a parametrized (e.g. weight_norm'd) nn.Linear: its weight is recomputed "
                         "at every call, so merge() could not fold the adapter in; remove the parametrization")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 < r <= min(base.weight.shape):
        raise ValueError(f"rank r={r!r} must be an integer in 1..{min(base.weight.shape)} "
                         f"(min of in={base.in_features}, out={base.out_features}) for this layer")
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (alpha 0: A and B never get a gradient)")
    if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
        raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
    if rslora not in (True, False):  # a string such as "no" would silently count as True
        raise ValueError(f"rslora={rslora!r} must be True or False")

def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 weights: one rounding per merge

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (composition: `self.base`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout=0.0, variant="lora", rslora=False):
        super().__init__()
        check_lora_args(base, r, alpha, dropout, variant, rslora)
        self.base, self.in_features, self.out_features = base.requires_grad_(False), base.in_features, base.out_features
        self.r, self.alpha, self.variant = int(r), alpha, variant
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: arXiv 2312.03732
        self.lora_A = nn.Parameter(base.weight.new_empty(r, self.in_features))  # W's dtype and device
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and loralib
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, r))
        if variant == "dora":
            self.lora_magnitude = nn.Parameter(base.weight.detach().norm(dim=1))  # (out,)
            self.register_buffer("lora_merged_norm", _at_least_f32(base.weight.new_zeros(self.out_features)))  # ||V||
        self.register_buffer("lora_merged_adapter", None, persistent=False)  # what merge() folded in
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True  # the user's switch, every mode
        self.coto_on = True  # CoTo's draw, training mode only; None: a CoTo is attached, not stepped yet
        self.merged = False  # saved in the state dict (get_extra_state), so a load restores it
        self.train(base.training)  # a new layer follows the mode of the model it goes into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.coto_on is None:
            raise RuntimeError("CoTo has not drawn yet: call coto.step(step) before each optimizer step")
        bypassed = not self.active or (self.training and not self.coto_on)
        if bypassed or self.merged:  # exactly the frozen layer (A, B get no grad), or W holds the adapter
            if self.merged and (bypassed or self.training and torch.is_grad_enabled() and self.lora_A.requires_grad):
                raise RuntimeError(f"a merged LoRA layer cannot be {'bypassed' if bypassed else 'trained'}: call "
                                   f"unmerge() first (for inference, model.eval() or torch.no_grad())")
            return self.base(x)
        xd = self.lora_dropout(x)  # (..., in)
        if self.variant == "hira":  # delta W = scaling * W ⊙ (B A): high rank from a rank-r B A
            return self.base(x) + xd @ (self.scaling * self.base.weight * (self.lora_B @ self.lora_A)).T
        lora = xd @ self.lora_A.T * self.scaling  # (..., r): scaled while narrow, before B widens it
        if self.variant == "dora":  # m / ||V|| row-wise, ||V|| detached (DoRA section 4.3); bias after the scale
            b = 0 if self.base.bias is None else self.base.bias
            return (self.lora_magnitude / self._dora_norm(self.base.weight)
                    * (self.base(x) - b + lora @ self.lora_B.T) + b)
        # base(x) + lora B^T, the product added in place into base's (T tokens, out) output: no second such tensor
        y = self.base(x.reshape(-1, x.shape[-1])).addmm_(lora.reshape(-1, self.r), self.lora_B.T.to(lora.dtype))
        return y.view(*x.shape[:-1], -1)

    def _scaled_BA(self, W: torch.Tensor) -> torch.Tensor:  # scaling * B A (out, in) in W's dtype
        with torch.autocast(W.device.type, enabled=False):
            return self.scaling * self.lora_B.to(W) @ self.lora_A.to(W)

    @torch.no_grad()
    def _dora_norm(self, W: torch.Tensor) -> torch.Tensor:
        """||W + scaling B A|| per row (out,) in W's dtype, no graph: a constant in backward."""
        return (W + self._scaled_BA(W)).norm(dim=1).clamp_min(1e-12)  # as F.normalize: a zero row stays 0

    @torch.no_grad()
    def _effective_weight(self, W: torch.Tensor) -> torch.Tensor:
        """W + delta W (out, in) for the unmerged weight W, in W's dtype."""
        if self.variant == "hira":
            return W + W * self._scaled_BA(W)
        V = W + self._scaled_BA(W)
        return V * (self.lora_magnitude.to(W) / self._dora_norm(W))[:, None] if self.variant == "dora" else V

    @torch.no_grad()
    def _unmerged_weight(self, W: torch.Tensor) -> torch.Tensor:
        """The unmerged W (out, in) recomputed from the merged weight W and the adapter, in W's dtype."""
        if self.variant == "hira":  # W' = W ⊙ (1 + s B A); merge() made sure no factor is near 0
            return W / (1 + self._scaled_BA(W))
        if self.variant == "dora":  # W' = m / n * V; a row with m = 0 had V = 0 (checked by merge())
            m, n = self.lora_magnitude.to(W), self.lora_merged_norm.to(W)
            W = W * torch.where(m == 0, 0, n / m)[:, None]
        return W - self._scaled_BA(W)

    def delta_weight(self) -> torch.Tensor:
        """W_effective - W (out, in) for any variant, merged or not."""
        W = _at_least_f32(self.base.weight)
        return (W - self._unmerged_weight(W) if self.merged else self._effective_weight(W) - W).to(self.base.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta W, so the layer costs one nn.Linear; refuses what unmerge() could not undo."""
        if self.merged:
            return
        W = _at_least_f32(self.base.weight)
        if self.variant == "hira" and (1 + self._scaled_BA(W)).abs().min() < 1e-3:  # W ⊙ (1 + s B A)
            raise ValueError("cannot merge this HiRA layer reversibly: 1 + scaling * B A is near 0 at some entry, "
                             "and unmerge() would divide by it; merge_and_unload(model) folds it for good")
        if self.variant == "dora":  # the row norms ||V|| merge() divides by, kept for unmerge()
            self.lora_merged_norm.copy_(self._dora_norm(W))
            if ((self.lora_magnitude == 0) & (self.lora_merged_norm > 1e-12)).any():
                raise ValueError("cannot merge this DoRA layer reversibly: a row with magnitude 0 becomes a zero "
                                 "row of W that unmerge() cannot restore; merge_and_unload(model) folds it for good")
        self.base.weight.copy_(self._effective_weight(W))
        self.merged, self.lora_merged_adapter = True, nn.utils.parameters_to_vector(self.parameters(recurse=False))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W recomputed from the merged weight and the adapter (as PEFT does). Idempotent."""
        if self.merged:
            if self.lora_merged_adapter is not None and not torch.equal(
                    self.lora_merged_adapter, nn.utils.parameters_to_vector(self.parameters(recurse=False))):
                raise RuntimeError("this layer's adapter changed while merged (an optimizer step?), so W cannot be "
                                   "recovered: unmerge before stepping, or keep the weights: merge_and_unload(model)")
            self.base.weight.copy_(self._unmerged_weight(_at_least_f32(self.base.weight)))
        self.merged, self.lora_merged_adapter = False, None

    def get_extra_state(self) -> dict:  # the state dict says whether its weights are merged
        return {"merged": self.merged}

    def set_extra_state(self, state: dict) -> None:
        self.merged, self.lora_merged_adapter = bool(state["merged"]), None


def lora_layers(model: nn.Module) -> dict:  # every LoRALinear of `model` by qualified name, in module order
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}

def inject_lora(model: nn.Module, targets, r: int, alpha: float, dropout=0.0, variant="lora", rslora=False) -> list:
    """Wrap in a LoRALinear every nn.Linear named `<target>` or `...<target>`, all or none; returns the names."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise ValueError("inject_lora before wrapping the model in DistributedDataParallel (it syncs what it saw)")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: unload(model) or merge_and_unload(model) first")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    matches = {t: [n for n in linears if n == t or n.endswith("." + t)] for t in targets}
    if not targets or not all(matches.values()):
        raise ValueError(f"targets {[t for t, n in matches.items() if not n] or targets} match no nn.Linear; "
                         f"the linear layers are: {', '.join(linears) or '(none)'}")
    names = [n for n in linears if any(n in found for found in matches.values())]
    direct = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    for name in names:
        if any(isinstance(m, direct) and linears[name] in m.modules() for m in model.modules()):
            raise ValueError(f"cannot adapt {name}: nn.MultiheadAttention (out_proj) and nn.Transformer*Layer (eval "
                             f"fast path) read the weight directly, skipping the adapter")
        tied = [n for n, p in model.named_parameters(remove_duplicate=False) if p is linears[name].weight]
        if len(tied) > 1:
            raise ValueError(f"cannot adapt {name}: {' and '.join(tied)} are one tensor, which merging would rewrite; "
                             f"untie first ({name}.weight = nn.Parameter(its weight.detach().clone()))")
        check_lora_args(linears[name], r, alpha, dropout, variant, rslora)
    for name in names:
        model.set_submodule(name, LoRALinear(linears[name], r, alpha, dropout, variant, rslora))
    return names

def _lora_params(model: nn.Module) -> dict:  # lora_A, lora_B (and lora_magnitude) by qualified name
    return {f"{n}.{k}": p for n, layer in lora_layers(model).items() for k, p in layer.named_parameters(recurse=False)}

def mark_only_lora_as_trainable(model: nn.Module, also=()) -> str:
    """Train only the LoRA parameters (found by module type) and the modules named in `also`."""
    extra = [model.get_submodule(name) for name in also]  # torch names a missing one
    model.requires_grad_(False)
    for p in [*_lora_params(model).values(), *(p for module in extra for p in module.parameters())]:
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line

def lora_state_dict(model: nn.Module) -> dict:  # the LoRA parameters only, by qualified name (detached copies)
    return {key: p.detach().clone() for key, p in _lora_params(model).items()}

def lora_metadata(model: nn.Module) -> dict:
    """{"variant", "r", "alpha", "scaling"} as strings: what tells a HiRA from a LoRA adapter file."""
    settings = {(m.variant, str(m.r), str(float(m.alpha)), str(float(m.scaling))) for m in lora_layers(model).values()}
    if len(settings) != 1:
        raise ValueError(f"one record describes LoRA layers of one setting; this model's: {settings or 'none'}")
    return dict(zip(("variant", "r", "alpha", "scaling"), settings.pop()))

@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict, metadata: dict | None = None) -> None:
    """Load what lora_state_dict saved, after checking keys, shapes and the fields `metadata` has."""
    if metadata is None:  # variant, alpha and rslora leave no trace in the tensors: another loads at the wrong scale
        warnings.warn("no metadata: variant, alpha and rslora unchecked; pass the lora_metadata(model) saved with it")
    own = lora_metadata(model) if metadata is not None else {}
    if diff := [k for k in own if k in metadata and str(metadata[k]) != own[k]]:
        raise ValueError(f"LoRA state was saved as {', '.join(f'{k}={metadata[k]}' for k in diff)}, this "
                         f"model has {', '.join(f'{k}={own[k]}' for k in diff)}: inject_lora with the saved settings")
    own = _lora_params(model)
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [f"{k} has shape {tuple(state[k].shape)} in the state but {tuple(p.shape)} in the model"
              for k, p in own.items() if k in state and state[k].shape != p.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"LoRA state does not fit this model (another model, r or targets?): {len(missing)} missing "
                         f"keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. {'; '.join(shapes[:2])}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("cannot load a LoRA state into merged layers: call unmerge_lora(model) first")
    for key, p in own.items():
        p.copy_(state[key])

def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()

def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()

@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight for good and put the plain nn.Linear back (in place)."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.base.weight.copy_(layer._effective_weight(_at_least_f32(layer.base.weight)))
        model.set_submodule(name, layer.base)
    return model

def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter, unmerging it first, and put the plain nn.Linear back (in place)."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        model.set_submodule(name, layer.base)
    return model
