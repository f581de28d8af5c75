"""vit.py against an explicit float64 re-derivation of timm's ViT arithmetic, timm's key names, and
the weight-loading errors."""
import math

import pytest
import torch

from lab.utils import write_safetensors
from lab.vit_weights import load_pretrained_file
from vit import VisionTransformer, load_pretrained

KW = dict(img_size=8, patch_size=4, in_chans=2, num_classes=3, embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0)


def reference_forward(sd: dict, x: torch.Tensor, *, patch_size: int, num_heads: int, depth: int):
    """The ViT written out formula by formula from a timm-format state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, C, H, W = x.shape
    p = patch_size

    def layer_norm(h, name):  # biased variance, eps 1e-6
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def linear(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    # patches in row-major order, each flattened as (C, p, p) like the conv weight
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    D = sd["patch_embed.proj.weight"].shape[0]
    tok = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    h = torch.cat([sd["cls_token"].expand(B, 1, D), tok], 1) + sd["pos_embed"]
    hd = D // num_heads
    for i in range(depth):
        b = f"blocks.{i}"
        qkv = linear(layer_norm(h, f"{b}.norm1"), f"{b}.attn.qkv")  # (B, N, 3D): q | k | v
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(B, -1, num_heads, hd).transpose(1, 2) for j in range(3))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        attn = torch.exp(scores - scores.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        h = h + linear((attn @ v).transpose(1, 2).reshape(B, -1, D), f"{b}.attn.proj")
        a = linear(layer_norm(h, f"{b}.norm2"), f"{b}.mlp.fc1")
        h = h + linear(0.5 * a * (1 + torch.erf(a / math.sqrt(2))), f"{b}.mlp.fc2")
    return linear(layer_norm(h, "norm")[:, 0], "head")


def timm_state_dict(*, img_size, patch_size, in_chans, num_classes, embed_dim, depth, mlp_ratio, seed=0, **_):
    """Random weights under the key names and shapes of timm's VisionTransformer
    (class token, no fc_norm, qkv_bias=True), typed out from timm's state dict."""
    g = torch.Generator().manual_seed(seed)
    D, n, hidden = embed_dim, (img_size // patch_size) ** 2, int(embed_dim * mlp_ratio)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, n + 1, D),
              "patch_embed.proj.weight": (D, in_chans, patch_size, patch_size), "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.norm1.weight": (D,), f"blocks.{i}.norm1.bias": (D,),
                       f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
                       f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
                       f"blocks.{i}.norm2.weight": (D,), f"blocks.{i}.norm2.bias": (D,),
                       f"blocks.{i}.mlp.fc1.weight": (hidden, D), f"blocks.{i}.mlp.fc1.bias": (hidden,),
                       f"blocks.{i}.mlp.fc2.weight": (D, hidden), f"blocks.{i}.mlp.fc2.bias": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (num_classes, D),
                   "head.bias": (num_classes,)})
    return {k: 0.3 * torch.randn(s, generator=g) + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, s in shapes.items()}


def test_state_dict_has_timm_names_and_shapes():
    model = VisionTransformer(**KW)
    ref = timm_state_dict(**KW)
    assert list(model.state_dict()) == list(ref)  # same names, same order as timm
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_forward_matches_float64_formula_on_timm_weights(device):
    model = VisionTransformer(**KW).double()
    sd = timm_state_dict(**KW)
    model.load_state_dict(sd, strict=True)
    model.to(device)
    x = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_forward(sd, x, patch_size=4, num_heads=3, depth=2)  # on the CPU
    torch.testing.assert_close(model(x.to(device)).cpu(), ref, rtol=1e-10, atol=1e-10)
    # the three pieces games.py uses compose to exactly the forward pass
    h = model.embed(x.to(device))
    assert h.shape == (5, 5, 12)
    for blk in model.blocks:
        h = blk(h)
    torch.testing.assert_close(model.forward_head(h).cpu(), ref, rtol=1e-10, atol=1e-10)


def test_float32_forward_close_to_reference_at_default_size(device):
    model = VisionTransformer()  # the training script's size: 28x28, patch 7, 1 channel
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    ref = reference_forward(model.state_dict(), x, patch_size=7, num_heads=4, depth=6)  # float64, CPU
    tol = 1e-5 if device.type == "cpu" else 2e-3  # cuDNN may run the patch convolution in TF32
    torch.testing.assert_close(model.to(device)(x.to(device)).double().cpu(), ref, rtol=10 * tol, atol=tol)


def test_loads_timm_files_and_names_bad_keys(tmp_path):
    sd = timm_state_dict(**KW, seed=3)
    write_safetensors(sd, tmp_path / "vit.safetensors")
    torch.save(sd, tmp_path / "vit.pth")
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    for name in ("vit.safetensors", "vit.pth"):
        model = VisionTransformer(**KW)
        load_pretrained_file(model, tmp_path / name, ignore_head=False)
        torch.testing.assert_close(model(x).double(), reference_forward(sd, x, patch_size=4, num_heads=3, depth=2),
                                   rtol=1e-4, atol=1e-5)

    # another task's head (any number of classes) is skipped by default, the model's own head kept
    model = VisionTransformer(**KW)
    head_before = model.head.weight.clone()
    other = {**sd, "head.weight": torch.zeros(1000, 12), "head.bias": torch.zeros(1000)}
    load_pretrained(model, other)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])

    wrong_shape = {**sd, "blocks.1.attn.qkv.weight": torch.zeros(30, 12)}
    write_safetensors(wrong_shape, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight: file \(30, 12\) vs model \(36, 12\)"):
        load_pretrained_file(VisionTransformer(**KW), tmp_path / "bad.safetensors")

    missing = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}  # a depth-1 model's file
    torch.save(missing, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"missing keys \(12\): blocks\.1\.norm1\.weight"):
        load_pretrained_file(VisionTransformer(**KW), tmp_path / "shallow.pth")

    renamed = {k.replace("attn.qkv", "attn.query_key_value"): v for k, v in sd.items()}  # not timm names
    with pytest.raises(ValueError, match=r"unexpected keys \(4\): blocks\.0\.attn\.query_key_value\.weight"):
        load_pretrained(VisionTransformer(**KW), renamed)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_file(VisionTransformer(**KW), tmp_path / "nope.safetensors")


def test_bad_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 2, 8, 8\), got \(1, 3, 8, 8\)"):
        VisionTransformer(**KW)(torch.zeros(1, 3, 8, 8))


def test_a_timm_file_converts_to_what_train_vit_init_reads(tmp_path):
    """python -m lab.vit_weights: a .safetensors file becomes a torch.save'd state dict of the same tensors."""
    import subprocess
    import sys
    from pathlib import Path
    sd = timm_state_dict(**KW, seed=5)
    write_safetensors(sd, tmp_path / "vit.safetensors")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "lab.vit_weights", str(tmp_path / "vit.safetensors"),
                           str(tmp_path / "vit.pt")], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(tmp_path / "vit.pt", weights_only=True)
    assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd)
    (tmp_path / "bad.safetensors").write_bytes(b"\x01" * 7)
    proc = subprocess.run([sys.executable, "-m", "lab.vit_weights", str(tmp_path / "bad.safetensors"),
                           str(tmp_path / "bad.pt")], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("lab.vit_weights: error: ") and len(proc.stderr.splitlines()) == 1
