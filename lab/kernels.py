"""The fast path of lora.LoRALinear: forward and backward written by hand, tested equal to the
classroom layer (tests/test_kernels.py) and raced against it by `python -m lab.bench --layer-only`.

    from lab.kernels import use_fast_kernels
    use_fast_kernels(model)  # every LoRALinear of model now runs FastLoRALinear.forward

What it does that autograd on lora.py's formula does not: backward skips the frozen W's gradient;
without dropout and with at least in * out / (in + out) tokens, forward builds W + s B A and x meets
one (out, in) matrix (fewer FLOPs than the two thin products and no pass over the (T, out) output);
DoRA's scale m / ||V|| (out,) is moved onto W and B in backward instead of scaling a (T, out)
tensor; the rank-r intermediates are kept as (r, T), which a CPU multiplies faster than (T, r).
With s = scaling, LoRA's backward:
    dX = dY W + s (dY B) A,    dA = s (dY B)^T X,    dB = s dY^T (X A^T)
Shapes: T tokens (all leading dims flattened), x (T, in), W (out, in), A (r, in), B (out, r).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, lora_layers


def _check_frozen(ctx) -> None:
    if ctx.needs_input_grad[2]:
        raise RuntimeError("FastLoRALinear's base.weight requires grad, but its backward computes no "
                           "gradient for the frozen W: freeze it (layer.base.requires_grad_(False)), "
                           "or use lora.LoRALinear, whose autograd backward does")


class LoRAFunction(torch.autograd.Function):
    """y = g * (x W^T + s xd A^T B^T) + b; xd = dropout(x) (None without dropout: x), g = DoRA's
    m / ||V|| (out,) with ||V|| detached, so that g's gradient goes to m alone; None for LoRA (g = 1)."""

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


class FastLoRALinear(LoRALinear):
    """lora.LoRALinear with forward and backward written by hand (the same function, faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.active or (self.training and not self.coto_on):
            return super().forward(x)  # bypassed or merged: the classroom layer's rule and errors
        if type(self.base).forward is not nn.Linear.forward:
            return super().forward(x)  # a subclass's own forward (quantised, say) is the classroom's job
        x2 = x.reshape(-1, self.base.in_features)  # (T, in)
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
        return y.view(*x.shape[:-1], self.base.out_features)


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Every LoRALinear of `model` runs the hand-written kernels from now on (in place)."""
    for layer in lora_layers(model).values():
        layer.__class__ = FastLoRALinear
    return model
