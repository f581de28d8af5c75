"""ViT weight files: a timm-format .safetensors / .pth / .pt / .bin file into vit.py's VisionTransformer,
and converted to the torch.save'd state dict that lab.vit_runs --init reads.

    python -m lab.vit_weights timm_vit.safetensors vit.pt   # then: python -m lab.vit_runs --init vit.pt
"""
import sys

import torch

from lab.utils import load_weights
from vit import VisionTransformer, load_pretrained


def read_state(path) -> dict:
    """The state dict of tensors in a local weights file (no pickled code is run)."""
    state = load_weights(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_pretrained_file(model: VisionTransformer, path, ignore_head: bool = True) -> None:
    """vit.load_pretrained from a local .safetensors / .pth / .pt / .bin file; errors name the file."""
    try:
        load_pretrained(model, read_state(path), ignore_head=ignore_head)
    except ValueError as e:
        raise ValueError(f"cannot load {path}: {e}") from None


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    try:
        torch.save(read_state(sys.argv[1]), sys.argv[2])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"lab.vit_weights: error: {e}")
    print(f"wrote {sys.argv[2]}: use it as python -m lab.vit_runs --init {sys.argv[2]}")
