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
  hira:  delta W = scaling * W (Hadamard) (B A): a high-rank update from the same A and B. The
         HiRA authors' code computes W (Hadamard) (1 + B A), with no scaling: alpha = r (and
         rslora off) gives exactly that form; other alphas scale the update as LoRA's alpha does.

A layer with `active = False` is bypassed (CoTo, method.md section 2): it returns exactly base(x)
and computes no LoRA term, so its LoRA parameters get no gradient (grad stays None) and AdamW
neither moves nor decays them. Merging is explicit (`merge()` / `unmerge()`), never hidden in
train() / eval(); unmerge() recomputes W from the adapter (as PEFT does), and the merged flag is
part of the state dict. A merged layer cannot be bypassed or trained: unmerge it first.
"""
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("lora", "dora", "hira")
NORM_EPS = 1e-12  # DoRA's row norms are clamped to this, as F.normalize does: a zero row stays zero
HIRA_MIN_FACTOR = 1e-3  # merge() refuses a HiRA factor 1 + scaling B A closer to 0 (see merge)


def check_lora_args(base: nn.Module, r, alpha, dropout, variant, rslora) -> None:
    """Raise a TypeError / ValueError naming the argument for anything LoRALinear cannot take."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    out_features, in_features = base.weight.shape
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"rank r={r!r} must be an int, got {type(r).__name__}")
    if not 0 < r <= min(in_features, out_features):
        raise ValueError(f"rank r={r!r} must be an integer in 1..{min(in_features, out_features)} "
                         f"(min of in={in_features}, out={out_features}) for this layer")
    for name, value in (("alpha", alpha), ("dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (scaling = alpha / r; alpha 0 "
                         f"gives a dead adapter whose A and B never get a gradient)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    if not isinstance(rslora, bool):
        raise TypeError(f"rslora={rslora!r} must be True or False, got {type(rslora).__name__}")


# ---------------------------------------------------------------------------------------------
# Forward and backward written out by hand (LoRAFunction, HiRAFunction); tests/test_lora_backward.py
# checks them in float64 against autograd on the formulas above, written as plain code. By hand,
# backward skips the frozen W's gradient, the low-rank term is added into the base matmul's output
# instead of a separate (T, out) sum, and only what backward needs is saved. With s = scaling, LoRA:
#     dX = dY W + s (dY B) A,    dA = s (dY B)^T X,    dB = s dY^T (X A^T)
# Shapes: T tokens (all leading dims flattened), x (T, in), W (out, in), A (r, in), B (out, r).


def _check_frozen(ctx) -> None:
    if ctx.needs_input_grad[2]:
        raise RuntimeError("LoRALinear's base.weight requires grad, but its backward computes no "
                           "gradient for the frozen W: freeze it (layer.base.requires_grad_(False)), "
                           "or merge_and_unload(model) to fine-tune the plain weights")


class LoRAFunction(torch.autograd.Function):
    """y = g * (x W^T + s xd A^T B^T) + b; xd = dropout(x) (None without dropout: x), g = DoRA's
    m / ||V|| (out,) with ||V|| detached, so that g's gradient goes to m alone; None for LoRA (g = 1).

    Without dropout and with at least in * out / (in + out) tokens, forward builds W + s B A and
    x meets one (out, in) matrix: fewer FLOPs than the two thin products, and no pass over the
    (T, out) output. Otherwise the thin products, as loralib and PEFT run them. Backward saves no
    (out, in) matrix either way (the frozen W costs no extra memory). The rank-r intermediates
    are kept as (r, T): on a CPU, B^T dy^T runs two to three times faster than dy B, the same
    product laid out as (T, r)."""

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, s, g):
        _check_frozen(ctx)
        (T, _), (out, inp) = x.shape, W.shape
        ctx.s, ctx.same = s, xd is None
        xd = x if xd is None else xd
        fused = ctx.same and T * (inp + out) >= inp * out
        # u = s A xd^T (r, T), scaled here (r rows, not out columns); only dB needs it when fused
        u = (A @ xd.T).mul_(s) if ctx.needs_input_grad[5] or not fused else None
        bias = b if g is None else None  # DoRA adds b after its scale
        if fused:
            h = F.linear(x, torch.addmm(W, B, A, alpha=s), bias)  # W + s B A: (out, in)
        else:
            h = F.linear(x, W, bias).addmm_(u.T, B.T)  # x W^T, then += s xd A^T B^T in place
        y = h if g is None else (h * g if b is None else torch.addcmul(b, h, g))  # (T, out)
        ctx.save_for_backward(xd, W, A, B, u, g, h if ctx.needs_input_grad[7] else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (T, out)
        xd, W, A, B, u, g, h = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, xd, W, b, A, B, s, g (g and h are None for LoRA)
        dg = (dy * h).sum(0) if need[7] else None  # (out,)
        if g is not None:  # the rest is LoRA's backward for dy * g, with g moved onto W and B:
            W, B = g[:, None] * W, g[:, None] * B  # scaling (out, in) costs less than (T, out)
        v = (B.T @ dy.T).mul_(ctx.s)  # (r, T) = s (dy B)^T
        dx = dy @ W if need[0] else None
        if need[0] and ctx.same:
            dx.addmm_(v.T, A)  # dX = dy W + s (dy B) A
        dxd = v.T @ A if need[1] else None  # with dropout that term is xd's, taken through the mask
        db = dy.sum(0) if need[3] else None
        dA = v @ xd if need[4] else None  # (r, in) = s (dy B)^T xd
        dB = (u @ dy).T if need[5] else None  # (out, r) = s dy^T (xd A^T)
        if need[5] and g is not None:
            dB = dB * g[:, None]
        return dx, dxd, None, db, dA, dB, None, dg


class HiRAFunction(torch.autograd.Function):
    """y = x W^T + xd D^T + b with D = s W * (B A) (Hadamard); without dropout (xd None: x) one
    matmul with W + D. Backward: G = dy^T xd (out, in), dBA = s W * G, dB = dBA A^T, dA = B^T dBA."""

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, s):
        _check_frozen(ctx)
        D = (B @ A).mul_(W).mul_(s)  # (out, in)
        ctx.s, ctx.same = s, xd is None
        xd = x if xd is None else xd
        if ctx.same:
            y = F.linear(x, D.add_(W), b)  # D now holds W + D: one matmul
        else:
            y = F.linear(x, W, b).addmm_(xd, D.T)
        ctx.save_for_backward(xd, W, A, B, D)
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, W, A, B, D = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, xd, W, b, A, B, s
        dx = dy @ (D if ctx.same else W) if need[0] else None  # without dropout D holds W + D
        dxd = dy @ D if need[1] else None
        db = dy.sum(0) if need[3] else None
        dBA = (dy.T @ xd).mul_(W).mul_(ctx.s) if need[4] or need[5] else None  # (out, in) = s W * (dy^T xd)
        dA = B.T @ dBA if need[4] else None  # (r, in)
        dB = dBA @ A.T if need[5] else None  # (out, r)
        return dx, dxd, None, db, dA, dB, None


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (composition: `self.base`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 variant: str = "lora", rslora: bool = False):
        super().__init__()
        check_lora_args(base, r, alpha, dropout, variant, rslora)
        self.base = base.requires_grad_(False)
        self.out_features, self.in_features = base.weight.shape
        self.r, self.alpha, self.variant = r, alpha, variant
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: arXiv 2312.03732
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and loralib
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        if variant == "dora":
            self.lora_magnitude = nn.Parameter(base.weight.detach().norm(dim=1))  # (out,)
            # ||W + scaling B A|| per row as merge() divided by it: m V / ||V|| cannot give it back,
            # and unmerge() needs it. (out,); read only while merged.
            self.register_buffer("lora_merged_norm", torch.zeros(self.out_features, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True  # False: bypassed, exactly base(x)
        self.merged = False  # saved in the state dict (get_extra_state), so a load restores it

    def _dora_norm(self, W: torch.Tensor) -> torch.Tensor:
        """||W + scaling B A|| per output row, (out,), clamped away from 0. A constant in backward
        (DoRA section 4.3), so it is computed without building a graph, and in W's precision."""
        with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
            V = torch.addmm(W, self.lora_B, self.lora_A, alpha=self.scaling)  # (out, in)
            return V.norm(dim=1).clamp_min(NORM_EPS)

    def _effective_weight(self, W: torch.Tensor) -> torch.Tensor:
        """W + delta W for the unmerged weight W: (out, in)."""
        BA = self.lora_B @ self.lora_A
        if self.variant == "hira":
            return W + self.scaling * (W * BA)
        V = W + self.scaling * BA
        if self.variant == "dora":  # m V / ||V||, row by row
            return (self.lora_magnitude / self._dora_norm(W))[:, None] * V
        return V

    @torch.no_grad()
    def _unmerged_weight(self) -> torch.Tensor:
        """W recomputed from the merged weight W' and the adapter (nothing else is kept): (out, in)."""
        W_merged, s, BA = self.base.weight, self.scaling, self.lora_B @ self.lora_A
        if self.variant == "lora":  # W' = W + s B A
            return W_merged - s * BA
        if self.variant == "hira":  # W' = W * (1 + s B A); merge() made sure no factor is near 0
            return W_merged / (1 + s * BA)
        # dora: W' = m / n * V with V = W + s B A; a row with m = 0 had V = 0 (checked by merge())
        m, n = self.lora_magnitude, self.lora_merged_norm
        return W_merged * torch.where(m == 0, 0, n / m)[:, None] - s * BA

    def delta_weight(self) -> torch.Tensor:
        """W_effective - W, shape (out, in), for any variant, merged or not."""
        if self.merged:
            return self.base.weight - self._unmerged_weight()
        return self._effective_weight(self.base.weight) - self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta_weight(); the layer then costs exactly one nn.Linear. Idempotent.
        unmerge() recomputes W from the merged weight, so merge() refuses an update it could not
        undo (merge_and_unload folds any update for good)."""
        if self.merged:
            return
        W, s = self.base.weight, self.scaling
        if self.variant == "hira":
            factor = 1 + s * self.lora_B @ self.lora_A  # W' = W * factor, elementwise
            if factor.abs().min() < HIRA_MIN_FACTOR:
                raise ValueError(f"cannot merge this HiRA layer reversibly: W is multiplied elementwise "
                                 f"by 1 + scaling * B A, which is {factor.abs().min().item():.1e} at some "
                                 f"entry, and unmerge() would divide by it. Use merge_and_unload(model) "
                                 f"to fold the adapters for good, or keep the layer unmerged")
        if self.variant == "dora":
            norm = self._dora_norm(W)
            if ((self.lora_magnitude == 0) & (norm > NORM_EPS)).any():
                raise ValueError("cannot merge this DoRA layer reversibly: a row with magnitude 0 "
                                 "becomes a zero row of W and unmerge() could not restore it. Use "
                                 "merge_and_unload(model) to fold the adapters for good")
            self.lora_merged_norm.copy_(norm)
        W.copy_(self._effective_weight(W))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W recomputed from the merged weight and the adapter. Idempotent."""
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight())
            self.merged = False

    def get_extra_state(self) -> dict:
        return {"merged": self.merged}

    def set_extra_state(self, state: dict) -> None:
        # the weights of the same state dict are loaded as they were saved, merged or not
        self.merged = bool(state["merged"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active:
            # a merged W already holds the adapter, and its A and B are not in the graph
            if self.merged and (not self.active or (self.training and torch.is_grad_enabled()
                                                    and self.lora_A.requires_grad)):
                doing = "bypassed (active=False)" if not self.active else "trained (train mode, grad enabled)"
                raise RuntimeError(f"this LoRA layer is merged into its weight, so it cannot be {doing}: "
                                   f"call unmerge() (or unmerge_lora(model)) first; to run the merged model "
                                   f"for inference, use model.eval() or torch.no_grad()")
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        W, b, A, B = self.base.weight, self.base.bias, self.lora_A, self.lora_B
        # under autocast (bf16 training) cast as F.linear would: the Functions run in the dtype given
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x2, W, b, A, B = (t if t is None else t.to(dtype) for t in (x2, W, b, A, B))
        xd = self.lora_dropout(x2)
        # no dropout (or eval mode): pass None, not x2 twice (torch.compile cannot trace a Function
        # given one tensor twice); the Functions then fuse more
        xd = None if xd is x2 else xd
        if self.variant == "lora":
            y = LoRAFunction.apply(x2, xd, W, b, A, B, self.scaling, None)
        elif self.variant == "dora":  # m / ||V|| with ||V|| detached (DoRA section 4.3)
            g = self.lora_magnitude / self._dora_norm(self.base.weight)
            y = LoRAFunction.apply(x2, xd, W, b, A, B, self.scaling, g.to(x2.dtype))
        else:
            y = HiRAFunction.apply(x2, xd, W, b, A, B, self.scaling)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"active={self.active}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------
# Model-level helpers


def lora_layers(model: nn.Module) -> dict:
    """Every LoRALinear of `model`, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def inject_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.0,
                variant: str = "lora", rslora: bool = False) -> list:
    """Wrap every nn.Linear whose qualified name ends with one of `targets` (e.g. "qkv",
    "attn.proj") in a LoRALinear, in place, and return the replaced names. Call it after loading
    pretrained weights. All or nothing: every target and layer is checked before the first is replaced."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets={targets!r} must be a non-empty list of module-name suffixes")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; call unload(model) to remove them (or "
                         "merge_and_unload(model) to fold them into the weights) first")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no nn.Linear; the linear layers are: "
                         f"{', '.join(linears) or '(none)'}")
    names = [n for n in linears if any(_matches(n, t) for t in targets)]
    for name in names:
        check_lora_args(model.get_submodule(name), r, alpha, dropout, variant, rslora)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, variant, rslora))
    return names


def _lora_params(model: nn.Module) -> dict:
    """lora_A, lora_B (and lora_magnitude) of every LoRALinear, by qualified name."""
    return {f"{name}.{pname}": p for name, layer in lora_layers(model).items()
            for pname, p in layer.named_parameters(recurse=False)}


def mark_only_lora_as_trainable(model: nn.Module, also: Sequence[str] = ()) -> str:
    """Freeze everything except the LoRA parameters (chosen by module type, not by name) and the
    modules named in `also` (e.g. a task head). Prints and returns the parameter count line."""
    model.requires_grad_(False)
    for p in _lora_params(model).values():
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
    return {key: p.detach().clone() for key, p in _lora_params(model).items()}


def lora_metadata(model: nn.Module) -> dict:
    """What an adapter file must record besides its tensors to be loaded correctly (strings, as
    safetensors metadata): {"variant", "r", "alpha", "scaling"}. A HiRA and a LoRA adapter have
    the same keys and shapes: only this tells them apart."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (inject_lora first)")
    records = {name: {"variant": layer.variant, "r": str(layer.r), "alpha": str(float(layer.alpha)),
                      "scaling": str(float(layer.scaling))} for name, layer in layers.items()}
    first_name, first = next(iter(records.items()))
    for name, record in records.items():
        if record != first:
            raise ValueError(f"{name} has {record} but {first_name} has {first}: one metadata record "
                             f"describes one setting")
    return first


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict, metadata: dict | None = None) -> None:
    """Load what lora_state_dict saved; any mismatch is an error naming the key and the shapes.
    `metadata` (what lora_metadata recorded at saving) is checked field by field against this
    model's; fields it does not record are not checked."""
    if metadata is not None:
        own = lora_metadata(model)
        diff = [k for k in own if k in metadata and str(metadata[k]) != own[k]]
        if diff:
            raise ValueError(f"LoRA state was saved as {', '.join(f'{k}={metadata[k]}' for k in diff)}, "
                             f"this model has {', '.join(f'{k}={own[k]}' for k in diff)}: inject_lora "
                             f"with the saved settings before loading")
    own = _lora_params(model)
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
    """Fold every adapter into its weight for good and put the plain nn.Linear back, so the model
    has its original parameter names ("blocks.0.attn.qkv.weight") and costs nothing extra (PEFT's
    merge_and_unload). In place; returns model."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.base.weight.copy_(layer._effective_weight(layer.base.weight))
        _replace(model, name, layer.base)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging and put the plain nn.Linear back: the base model
    (merged layers are unmerged first; PEFT's unload). In place; returns model."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        _replace(model, name, layer.base)
    return model
