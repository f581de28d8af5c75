"""GPT-2 written out by hand, with the module names and the arithmetic of HF transformers'
`GPT2LMHeadModel`, so real GPT-2 checkpoints load and LoRA adapters travel to and from PEFT.

Radford et al., 2019 ("Language Models are Unsupervised Multitask Learners"), in the style of
nanoGPT's model.py: pre-norm blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, causal attention
scaled by 1/sqrt(head_dim), tanh GELU, LayerNorm eps 1e-5, learned positions, and an output
layer `lm_head` that shares its weight with the token embedding `transformer.wte`.

Names (as in every GPT-2 checkpoint): transformer.wte, transformer.wpe, transformer.h.{i}.ln_1,
.attn.c_attn, .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj, transformer.ln_f, lm_head. The linear
layers are nn.Linear with (out, in) weights, so lora.inject_lora(model, ["c_attn", "c_proj",
"c_fc"], ...) applies unchanged ("c_proj" matches both attn.c_proj and mlp.c_proj). HF stores
these four as Conv1D with (in, out) weights; load_hf / save_hf transpose them.

The forward pass is split in three so that analyses can run the blocks one at a time (games.py):

    h = model.embed(idx)              # (B, T) token ids -> (B, T, C)
    for blk in model.transformer.h:   # nn.ModuleList of Block
        h = blk(h)                    # (B, T, C)
    logits = model.forward_head(h)    # ln_f + lm_head -> (B, T, vocab_size)
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import lora_layers
from lab.utils import atomic_write_text, load_weights, write_safetensors

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF stores these (in, out)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v in one matmul, as GPT-2 stores them
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs), 1/sqrt(hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_inner: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(n_inner, n_embd)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_inner: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd, n_inner)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, *, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None):
        super().__init__()
        n_inner = n_inner or 4 * n_embd
        self.config = dict(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                           n_layer=n_layer, n_head=n_head, n_inner=n_inner)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(n_positions, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head, n_inner) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's init: normal(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 L)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * len(self.transformer.h)) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def embed(self, idx):
        """(B, T) token ids -> (B, T, C) token plus position embeddings."""
        T = idx.shape[1]
        if T > self.config["n_positions"]:
            raise ValueError(f"sequence of {T} tokens is longer than n_positions={self.config['n_positions']}")
        pos = torch.arange(T, device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)

    def forward_head(self, h):
        """(B, T, C) block outputs -> (B, T, vocab_size) logits."""
        return self.lm_head(self.transformer.ln_f(h))

    def forward(self, idx):
        h = self.embed(idx)
        for blk in self.transformer.h:
            h = blk(h)
        return self.forward_head(h)


@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None):
    """Sample max_new_tokens after the prompt idx (B, T); returns (B, T + max_new_tokens)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config["n_positions"]:])[:, -1, :] / temperature  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


# ---------------------------------------------------------------------------------------------
# HF checkpoints: a folder with config.json and model.safetensors or pytorch_model.bin


def read_config(folder) -> dict:
    """The GPT(**kwargs) of an HF GPT-2 folder's config.json; settings this model cannot reproduce are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--init {folder}: no such folder (expected a local HF GPT-2 folder "
                                f"with config.json plus model.safetensors or pytorch_model.bin)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: --init expects a local HF GPT-2 folder "
                                f"(config.json plus model.safetensors or pytorch_model.bin)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): damaged? Copy the model's config.json again") from None
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{path} describes model_type={hf.get('model_type')!r}; this loader reads GPT-2 only")
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                   "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)}
    for key, ok in unsupported.items():
        if key in hf and hf[key] not in ok:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported here (only {ok})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"{path}: layer_norm_epsilon={eps} is not supported here (only 1e-5)")
    return dict(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"))


def state_from_hf(hf_state: dict) -> dict:
    """A GPT-2 state dict in HF layout (with or without the "transformer." prefix, Conv1D
    weights (in, out), attention mask buffers) -> this model's names and (out, in) layout."""
    out = {}
    for k, v in hf_state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not parameters
            continue
        if k.endswith(tuple(f"{c}.weight" for c in CONV1D)):
            v = v.t()
        out[k if k == "lm_head.weight" else "transformer." + k] = v.contiguous()
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))  # tied: often not stored
    return out


def load_hf(folder) -> GPT:
    """A GPT from a local HF GPT-2 folder (e.g. a snapshot of openai-community/gpt2)."""
    folder = Path(folder)
    config = read_config(folder)
    files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin "
                                f"(sharded checkpoints are not supported)")
    model = GPT(**config)
    state = state_from_hf(load_weights(files[0]))
    own = model.state_dict()
    missing = [k for k in own if k not in state or state[k] is None]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k not in missing and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{files[0]} does not fit {folder / 'config.json'}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    model.load_state_dict(state)
    return model


def save_hf(model: GPT, folder) -> None:
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained
    loads (the base model PEFT adapters are applied to). The model must not hold LoRA layers."""
    if lora_layers(model):
        raise ValueError("save_hf writes a plain GPT-2: save before inject_lora, or merge_and_unload(model) first")
    folder = Path(folder)
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":  # tied to wte; HF checkpoints leave it out
            continue
        state[k] = v.t() if k.endswith(tuple(f"{c}.weight" for c in CONV1D)) else v
    c = model.config
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c["vocab_size"],
          "n_positions": c["n_positions"], "n_embd": c["n_embd"], "n_layer": c["n_layer"],
          "n_head": c["n_head"], "n_inner": c["n_inner"], "activation_function": "gelu_new",
          "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "bos_token_id": None,
          "eos_token_id": None, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    write_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(hf, indent=2))
