"""A small Vision Transformer, written out by hand with timm's module names and arithmetic.

Pre-norm ViT (Dosovitskiy et al., 2021) as timm's `VisionTransformer` computes it: a patchifying
convolution, a class token, a learned positional embedding over [class, patches], `depth` blocks of
`x + attn(norm1(x))`, `x + mlp(norm2(x))` (GELU, LayerNorm eps 1e-6), a final LayerNorm, the class
token's features, a linear head. The parameter names are timm's (`blocks.{i}.attn.qkv`, ...), so a
timm checkpoint of the same shape loads with `strict=True` and LoRA targets read as everywhere.

The forward pass is three pieces, so that analyses can run the blocks one at a time:

    h = model.embed(x)              # (B, C, H, W) -> (B, N+1, D): class token first, positions added
    h = model.blocks(h)             # nn.Sequential of Block, (B, N+1, D)
    logits = model.forward_head(h)  # final norm, class token, head -> (B, num_classes)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patch_size x patch_size patches and project each to D."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected images of shape (B, {self.in_chans}, {self.img_size}, "
                             f"{self.img_size}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v in one matmul, as timm stores them
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v, (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):  # (B, N+1, D) -> (B, N+1, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, *, img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128,
                 depth=6, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """timm's init: truncated normal (std 0.02) weights, zero biases, tiny class token; the conv keeps torch's."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x):
        """(B, C, H, W) images -> (B, N+1, D) tokens: class token first, positions added."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_head(self, h):
        """(B, N+1, D) block outputs -> (B, num_classes) logits: final norm, class token, head."""
        return self.head(self.norm(h)[:, 0])

    def forward(self, x):
        return self.forward_head(self.blocks(self.embed(x)))


def reset_head(model: VisionTransformer, num_classes: int, generator=None) -> None:
    """Replace the classifier by a fresh one for a new task (timm init, optional seeded generator)."""
    head = nn.Linear(model.embed_dim, num_classes, device=model.head.weight.device)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
    model.head, model.num_classes = head, num_classes


def load_pretrained(model: VisionTransformer, state: dict, ignore_head: bool = True) -> None:
    """Load a timm-format state dict into `model`, or stop with an error naming each bad key. With
    ignore_head the state's `head.*` (another task's classifier) is skipped and the model's own kept."""
    own = model.state_dict()
    skip = ("head.",) if ignore_head else ()
    missing = [k for k in own if k not in state and not k.startswith(skip)]
    unexpected = [k for k in state if k not in own and not k.startswith(skip)]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and not k.startswith(skip) and state[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{' ...' * (len(keys) > 8)}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
                if keys]
    if problems:
        raise ValueError("these weights do not fit this ViT:\n  " + "\n  ".join(problems) + "\n  They must be a "
                         "timm-format VisionTransformer state dict with the model's img_size, patch_size, in_chans, "
                         "embed_dim, depth and mlp_ratio (set those flags to match the file).")
    keep = {k: v for k, v in state.items() if not k.startswith(skip)}
    model.load_state_dict({**own, **keep}, strict=True)


if __name__ == "__main__":
    m = VisionTransformer()
    x = torch.randn(2, 1, 28, 28)
    print(m(x).shape, f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params,",
          f"{m.patch_embed.num_patches + 1} tokens of width {m.embed_dim}, {len(m.blocks)} blocks")
