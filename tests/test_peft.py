"""peft_io.py end to end with HF PEFT: adapters trained here load in PeftModel on transformers'
GPT2LMHeadModel with the same logits, and PEFT's adapters load back here. peft and transformers
are test-only dependencies."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model  # test-only, .ci/run installs them
from transformers import GPT2LMHeadModel

from lab.gpt2 import GPT, load_hf, save_hf
from lora import inject_lora, lora_layers
from lab.peft_io import load_peft_adapter, save_peft_adapter

TARGETS = ["c_attn", "c_proj", "c_fc"]


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=40, n_positions=16, n_embd=24, n_layer=2, n_head=3).eval()


def randomize_adapters(model, seed: int = 1) -> None:
    """B = 0 at init would make any adapter look like the base model: give every factor values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant,rslora", [("lora", False), ("dora", False), ("lora", True)])
def test_exported_adapter_gives_same_logits_in_peft(tmp_path, variant, rslora):
    model = small_gpt()
    save_hf(model, tmp_path / "base")
    inject_lora(model, TARGETS, r=4, alpha=8.0, variant=variant, rslora=rslora)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = hf(idx).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs, ours = peft_model(idx).logits, model(idx)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - base_logits).abs().max() > 0.1  # the adapter really is applied (not silently dropped)
    # and it comes back: the imported model gives the same logits
    back = load_hf(tmp_path / "base").eval()
    names = load_peft_adapter(back, tmp_path / "adapter")
    assert sorted(names) == sorted(lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours, atol=1e-6, rtol=0)


def test_adapter_made_by_peft_imports_here(tmp_path):
    model = small_gpt()
    save_hf(model, tmp_path / "base")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # the reference model's own parameters (peft names them so)
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    names = load_peft_adapter(model, tmp_path / "adapter")
    assert sorted(names) == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    idx = torch.randint(0, 40, (2, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), peft_model(idx).logits, atol=1e-5, rtol=0)


def test_silent_peft_failures_are_errors_here(tmp_path):
    model = small_gpt()
    inject_lora(model, TARGETS, r=2, alpha=4.0)
    save_peft_adapter(model, tmp_path / "good")
    conf = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    assert conf["target_modules"] == sorted(lora_layers(model))  # always written
    bad = tmp_path / "no_targets"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "target_modules": None}))
    with pytest.raises(ValueError, match="target_modules"):
        load_peft_adapter(small_gpt(), bad)
    from lab.utils import read_safetensors, write_safetensors
    wrong = tmp_path / "wrong_prefix"
    wrong.mkdir()
    state = read_safetensors(tmp_path / "good" / "adapter_model.safetensors")
    write_safetensors({k.removeprefix("base_model.model."): v for k, v in state.items()},
                      wrong / "adapter_model.safetensors")
    (wrong / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="prefix"):
        load_peft_adapter(small_gpt(), wrong)
    hira = small_gpt()
    inject_lora(hira, TARGETS, r=2, alpha=4.0, variant="hira")
    with pytest.raises(ValueError, match=r"PEFT has no HiRA layer.*lora\.merge_and_unload"):
        save_peft_adapter(hira, tmp_path / "hira")
