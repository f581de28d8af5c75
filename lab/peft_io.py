"""LoRA adapters in HF PEFT's format: train here (with CoTo), load there; and back.

PEFT saves a LoRA adapter as two files in one folder:
  adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
  adapter_model.safetensors    "base_model.model.<module>.lora_A.weight"  (r, in)
                               "base_model.model.<module>.lora_B.weight"  (out, r)
                               "base_model.model.<module>.lora_magnitude_vector"  (out,)  DoRA only
The factors have this project's layout (lora_A (r, in), lora_B (out, r)) also for GPT-2, whose
HF layers are Conv1D with (in, out) weights: PEFT's `fan_in_fan_out=True` only transposes the
merged product B A, never the factors. Two ways to lose an adapter without an error in PEFT, both
guarded here: a config without `target_modules` (PEFT then wraps nothing) and keys without the
"base_model.model." prefix (PEFT warns and keeps the base model). The safetensors header also
carries lora.lora_metadata (variant, r, alpha, scaling), checked against the config on loading.

    save_peft_adapter(model, "runs/milton", task_type="CAUSAL_LM")   # here
    base = GPT2LMHeadModel.from_pretrained("runs/base")   # there (gpt2.save_hf wrote it)
    peft_model = PeftModel.from_pretrained(base, "runs/milton")
"""
import json
import math
import warnings
from pathlib import Path

import torch.nn as nn

from lora import inject_lora, load_lora_state_dict, lora_layers, lora_metadata
from lab.utils import atomic_write_text, read_safetensors, read_safetensors_metadata, write_safetensors

PREFIX = "base_model.model."
FILE_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def save_peft_adapter(model: nn.Module, folder, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> None:
    """Write the model's adapters as adapter_config.json + adapter_model.safetensors. task_type is
    PEFT's ("CAUSAL_LM" for GPT-2, "SEQ_CLS", ...; None: a plain PeftModel, for any model)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export (inject_lora first)")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.scaling, layer.variant) != (first.r, first.alpha, first.scaling, first.variant):
            raise ValueError(f"{name} has another r, alpha or variant than the first layer: one "
                             f"adapter_config.json describes one setting")
    if first.variant == "hira":
        raise ValueError("PEFT has no HiRA layer: export a 'lora' or 'dora' adapter, or merge HiRA "
                         "into the weights (lora.merge_and_unload) and save the model instead")
    tensors = {}
    for name, layer in layers.items():
        for pname, key in FILE_KEYS.items():
            if hasattr(layer, pname):
                tensors[f"{PREFIX}{name}.{key}"] = getattr(layer, pname).detach()
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "use_rslora": not math.isclose(first.scaling, first.alpha / first.r),
        "use_dora": first.variant == "dora",
        "target_modules": sorted(layers),  # full names: PEFT matches exactly these modules
        "fan_in_fan_out": True,  # GPT-2's HF layers are Conv1D (in, out); PEFT turns it off for nn.Linear
        "bias": "none", "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    folder = Path(folder)
    write_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt", **lora_metadata(model)})
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))


def load_peft_adapter(model: nn.Module, folder) -> list:
    """Inject the adapters described in a PEFT LoRA folder into `model` (a plain GPT with HF
    module names) and load their weights. Returns the adapted module names."""
    folder = Path(folder)
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (cfg_path, st_path):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {f.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is damaged ({e}): replace it with the adapter's own adapter_config.json") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters can be imported")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{cfg_path}: target_modules={targets!r}; a list of module names is needed "
                         f"(PEFT's regex form and defaults are not supported)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key} (a different r or alpha per module) is not supported")
    defaults = {"r": 8, "lora_alpha": 8, "use_rslora": False, "use_dora": False}  # PEFT's LoraConfig's
    if missing := [key for key in defaults if key not in cfg]:  # the adapter's scale depends on them
        warnings.warn(f"{cfg_path} lacks {', '.join(missing)}: PEFT's defaults are used "
                      f"({', '.join(f'{k}={defaults[k]}' for k in missing)}); if the adapter was trained "
                      f"with others, it loads at the wrong scale")
    cfg = defaults | cfg
    raw = read_safetensors(st_path)
    bad = [k for k in raw if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{st_path}: key {bad[0]!r} lacks the {PREFIX!r} prefix PEFT expects "
                         f"(PEFT itself would silently keep the base model)")
    names = inject_lora(model, targets, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                        "dora" if cfg["use_dora"] else "lora", cfg["use_rslora"])
    state = {}
    for name, layer in lora_layers(model).items():
        for pname, key in FILE_KEYS.items():
            if hasattr(layer, pname) and PREFIX + f"{name}.{key}" in raw:
                state[f"{name}.{pname}"] = raw.pop(PREFIX + f"{name}.{key}")
    if raw:
        raise ValueError(f"{st_path}: {len(raw)} tensors fit no adapted module, e.g. {next(iter(raw))!r}")
    # names any module whose tensors are missing, and a file saved with another variant, r or alpha
    load_lora_state_dict(model, state, metadata=read_safetensors_metadata(st_path))
    return names
