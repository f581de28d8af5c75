"""peft_io.py end to end with HF PEFT: adapters trained here load in PeftModel on transformers'
GPT2LMHeadModel with the same logits, and PEFT's adapters load back here. peft and transformers
are test-only dependencies."""
import json

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model  # test-only, .ci/run installs them
from transformers import GPT2LMHeadModel

from lab.gpt2 import GPT, load_hf, save_hf
from lab.peft_io import load_peft_adapter, save_peft_adapter
from lab.utils import read_safetensors, read_safetensors_metadata, write_safetensors
from lora import inject_lora, lora_layers, lora_metadata

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
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"),
                      task_type="CAUSAL_LM")
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = hf(idx).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs, ours = peft_model(idx).logits, model(idx)
    assert type(peft_model).__name__ == "PeftModelForCausalLM"  # the task_type given
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


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_an_adapter_of_a_model_that_is_no_language_model_loads_in_peft(tmp_path):
    """task_type is the caller's (default None: PEFT's plain PeftModel), not always CAUSAL_LM,
    which PEFT cannot wrap around a model without generate()."""
    torch.manual_seed(0)
    base, model = MLP(), MLP()
    model.load_state_dict(base.state_dict())
    inject_lora(model, ["fc1", "fc2"], r=2, alpha=4.0)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] is None
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model.eval()(x), atol=1e-6, rtol=0)
        with theirs.disable_adapter():
            assert (theirs(x) - model(x)).abs().max() > 0.1  # the adapter really is applied


def test_the_file_carries_the_adapter_settings_and_a_config_without_them_warns(tmp_path):
    model = small_gpt()
    inject_lora(model, TARGETS, r=2, alpha=4.0, rslora=True)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "good")
    st = tmp_path / "good" / "adapter_model.safetensors"
    assert read_safetensors_metadata(st) == {"format": "pt", **lora_metadata(model)}
    conf = json.loads((tmp_path / "good" / "adapter_config.json").read_text())

    def folder(name, config, metadata):
        (tmp_path / name).mkdir()
        write_safetensors(read_safetensors(st), tmp_path / name / "adapter_model.safetensors", metadata=metadata)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        return tmp_path / name

    edited = folder("edited", {**conf, "lora_alpha": 8}, read_safetensors_metadata(st))
    with pytest.raises(ValueError, match=r"saved as alpha=4.0.*this model has alpha=8.0"):
        load_peft_adapter(small_gpt(), edited)  # the file knows its own scale
    bare = {k: v for k, v in conf.items() if k not in ("lora_alpha", "use_rslora")}
    warned = r"lacks lora_alpha, use_rslora: PEFT's defaults are used \(lora_alpha=8, use_rslora=False\)"
    with pytest.warns(UserWarning, match=warned), pytest.raises(ValueError, match="saved as alpha=4.0"):
        load_peft_adapter(small_gpt(), folder("bare", bare, read_safetensors_metadata(st)))
    # a file without the settings (as PEFT writes it) and a config without them: a warning, and
    # PEFT's defaults, which are right here (alpha 8, no rsLoRA), so the logits are the adapter's
    plain = small_gpt()
    inject_lora(plain, TARGETS, r=2, alpha=8.0)
    randomize_adapters(plain)
    save_peft_adapter(plain, tmp_path / "plain")
    st = tmp_path / "plain" / "adapter_model.safetensors"
    conf = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    back = small_gpt()
    with pytest.warns(UserWarning, match="lacks lora_alpha: PEFT's defaults are used"):
        load_peft_adapter(back, folder("peft_like", {k: v for k, v in conf.items() if k != "lora_alpha"},
                                       {"format": "pt"}))
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), plain(idx), atol=1e-6, rtol=0)


def test_a_damaged_config_is_named_and_an_eval_model_stays_in_eval_mode(tmp_path):
    model = small_gpt()
    inject_lora(model, TARGETS, r=2, alpha=4.0, dropout=0.5)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "good")
    target = small_gpt()  # eval mode: the adapters it gets must not drop out
    load_peft_adapter(target, tmp_path / "good")
    assert not any(layer.training for layer in lora_layers(target).values())
    x = torch.randint(40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(target(x), target(x), rtol=0, atol=0)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    (damaged / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match=r"damaged/adapter_config.json is damaged"):
        load_peft_adapter(small_gpt(), damaged)
