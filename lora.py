"""LoRA written by hand, with the DoRA and HiRA variants that CoTo is combined with.

LoRA (Hu et al., 2021, arXiv 2106.09685) freezes a pretrained linear layer and learns a low-rank
update beside it:

        x ──┬──────────────────┐
            │                  │ dropout
      ┌─────┴─────┐       ┌────┴────┐
      │     W     │       │    A    │  r x in, kaiming-uniform
      │  frozen   │       └────┬────┘
      │ out x in  │       ┌────┴────┐
      └─────┬─────┘       │    B    │  out x r, zeros at start
            │             └────┬────┘
            │                  │ * scaling (alpha / r)
            └────── + ─────────┘
                    │
                    y = W x + b + scaling * B A x

Variants (method.md section 1; all start exactly at the base model because B = 0):
  dora:  y = m / ||V|| * V x + b with V = W + scaling * B A, ||V|| the norm of each output row
         (treated as a constant in backward, DoRA section 4.3) and m a trainable vector (out,)
         initialised to the row norms of W.
  hira:  delta W = scaling * W (Hadamard) (B A): a high-rank update from the same A and B.

A layer with `active = False` is bypassed (CoTo, method.md section 2): it returns exactly base(x)
and computes no LoRA term, so its LoRA parameters get no gradient (grad stays None) and AdamW
neither moves nor decays them. Merging is explicit (`merge()` / `unmerge()`), never hidden in
train() / eval().
"""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("lora", "dora", "hira")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (composition: `self.base`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 variant: str = "lora", rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        out_features, in_features = base.weight.shape
        if not isinstance(r, int) or not 0 < r <= min(in_features, out_features):
            raise ValueError(f"rank r={r!r} must be an integer in 1..{min(in_features, out_features)} "
                             f"(min of in={in_features}, out={out_features}) for this layer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.variant = r, alpha, variant
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: arXiv 2312.03732
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and loralib
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        if variant == "dora":
            self.lora_magnitude = nn.Parameter(base.weight.detach().norm(dim=1))  # (out,)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True  # False: bypassed, exactly base(x)
        self.merged = False
        self._merged_delta = None  # the (out, in) tensor that merge() added to W

    def _update(self, W: torch.Tensor) -> torch.Tensor:
        """scaling * B A, or for HiRA its Hadamard product with W: (out, in)."""
        BA = self.lora_B @ self.lora_A
        return self.scaling * (W * BA if self.variant == "hira" else BA)

    def _dora_scale(self, W: torch.Tensor) -> torch.Tensor:
        """m / ||W + scaling B A|| per output row: (out,). The norm is a constant in backward
        (DoRA section 4.3), so it is computed without building a graph."""
        with torch.no_grad():
            norm = (W + self._update(W)).norm(dim=1)
        return self.lora_magnitude / norm

    def delta_weight(self) -> torch.Tensor:
        """W_effective - W, shape (out, in), for any variant; while merged, the delta that was merged."""
        if self.merged:
            return self._merged_delta
        W = self.base.weight
        if self.variant == "dora":
            return self._dora_scale(W)[:, None] * (W + self._update(W)) - W
        return self._update(W)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta_weight(); the layer then costs exactly one nn.Linear. Idempotent."""
        if not self.merged:
            self._merged_delta = self.delta_weight().detach().clone()
            self.base.weight += self._merged_delta
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): subtract the delta that was added. Idempotent."""
        if self.merged:
            self.base.weight -= self._merged_delta
            self._merged_delta, self.merged = None, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            return self.base(x)
        W, xd = self.base.weight, self.lora_dropout(x)
        if self.variant == "hira":
            if isinstance(self.lora_dropout, nn.Identity):  # one matmul: (W + delta W) x + b
                return F.linear(x, W + self._update(W), self.base.bias)
            return self.base(x) + F.linear(xd, self._update(W))
        # B (scaling * A x): two thin matmuls, never the (out, in) product; scaling the (..., r)
        # tensor costs less than scaling the (..., out) one
        lora = F.linear(self.scaling * F.linear(xd, self.lora_A), self.lora_B)
        if self.variant == "lora":
            return self.base(x) + lora
        # dora: m / ||V|| * (W x + scaling B A dropout(x)) + b
        y = self._dora_scale(W) * (F.linear(x, W) + lora)
        return y if self.base.bias is None else y + self.base.bias

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"active={self.active}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------
# Model-level helpers


def lora_layers(model: nn.Module) -> dict:
    """Every LoRALinear of `model`, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.0,
                variant: str = "lora", rslora: bool = False) -> list:
    """Wrap every nn.Linear whose qualified name ends with one of `targets` (e.g. "qkv",
    "attn.proj") in a LoRALinear, in place. Call it after loading pretrained weights.
    Returns the replaced names."""
    if isinstance(targets, str):
        targets = [targets]
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; call unload_lora(model) first")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n in linears if _matches(n, targets)]
    if not names:
        raise ValueError(f"targets {list(targets)} match no nn.Linear; the linear layers are: "
                         f"{', '.join(linears) or '(none)'}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, variant, rslora))
    return names


def _lora_params(layer: LoRALinear) -> dict:
    return dict(layer.named_parameters(recurse=False))  # lora_A, lora_B (and lora_magnitude)


def mark_only_lora_as_trainable(model: nn.Module, also: Sequence[str] = ()) -> str:
    """Freeze everything except the LoRA parameters (chosen by module type, not by name) and the
    modules named in `also` (e.g. a task head). Prints and returns the parameter count line."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in _lora_params(layer).values():
            p.requires_grad_(True)
    modules = dict(model.named_modules())
    for name in also:
        if name not in modules:
            top = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"`also` names {name!r}, which is not a module of the model; "
                             f"top-level modules: {top}")
        modules[name].requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    line = (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}")
    print(line)
    return line


def lora_state_dict(model: nn.Module) -> dict:
    """The LoRA parameters only, e.g. {"blocks.0.attn.qkv.lora_A": tensor, ...} (detached copies)."""
    return {f"{name}.{pname}": p.detach().clone()
            for name, layer in lora_layers(model).items()
            for pname, p in _lora_params(layer).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict) -> None:
    """Load what lora_state_dict saved; any mismatch is an error naming the key and the shapes."""
    layers = lora_layers(model)
    own = {f"{name}.{pname}": p for name, layer in layers.items()
           for pname, p in _lora_params(layer).items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit this model: missing keys {missing[:3]}, unexpected "
                         f"keys {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected). "
                         f"Was it saved from another model or with other targets?")
    for key, p in own.items():
        if state[key].shape != p.shape:
            raise ValueError(f"LoRA state does not fit this model: {key} has shape "
                             f"{tuple(state[key].shape)} in the state but {tuple(p.shape)} in the model "
                             f"(another r or another model size?)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("cannot load a LoRA state into merged layers: call unmerge_lora(model) first")
    for key, p in own.items():
        p.copy_(state[key])


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain nn.Linear back, so the model has its original
    parameter names ("blocks.0.attn.qkv.weight") and costs nothing extra. In place; returns model."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model
