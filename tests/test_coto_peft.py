"""lab.peft_coto: CoTo driving HF PEFT's own LoRA / DoRA layers and transformers' Trainer, against this project's
LoRALinear and explicit base-layer outputs. Tiny randomly initialised GPT-2 and LLaMA configs (no
download); peft and transformers are test-only dependencies."""
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model  # test-only, .ci/run installs them
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

from coto import CoTo, block_groups
from lab.gpt2 import GPT, load_hf, save_hf
from lab.peft_coto import CoToCallback, peft_block_groups
from lab.peft_io import load_peft_adapter, save_peft_adapter
from lora import inject_lora, lora_layers, mark_only_lora_as_trainable

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def peft_gpt2(use_dora=False, n_layer=3):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=24, n_layer=n_layer, n_head=3,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                                       bos_token_id=None, eos_token_id=None))
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=GPT2_TARGETS,
                                            fan_in_fan_out=True, use_dora=use_dora))


def peft_llama(use_dora=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    targets = ["q_proj", "v_proj", "down_proj"]
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                               use_dora=use_dora))


MODELS = {"gpt2": (peft_gpt2, 4), "llama": (peft_llama, 3)}  # (builder, adapted modules per block)


def randomize_B(model, seed=1):
    """B = 0 at init makes an adapter's output equal its base layer's: give B values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def lora_params(layer):
    return {n: p for n, p in layer.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_layers_are_grouped_per_block(arch):
    build, per_block = MODELS[arch]
    model = build()
    groups = peft_block_groups(model)
    prefix = {"gpt2": "base_model.model.transformer.h", "llama": "base_model.model.model.layers"}[arch]
    assert list(groups) == [f"{prefix}.{i}" for i in range(3)]
    named = {id(m): n for n, m in model.named_modules()}
    for i, layers in enumerate(groups.values()):
        assert len(layers) == per_block and all(named[id(l)].startswith(f"{prefix}.{i}.") for l in layers)
    # a classification head PEFT trains in full (modules_to_save) is not an adapter CoTo switches
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=24, n_layer=2, n_head=3))
    with_head = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                modules_to_save=["lm_head"]))
    assert [len(v) for v in peft_block_groups(with_head).values()] == [1, 1]


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("arch", list(MODELS))
def test_bypassed_peft_layers_give_the_base_output_and_no_grad(arch, use_dora, device):
    model = MODELS[arch][0](use_dora)
    randomize_B(model)
    model.to(device)
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    model.eval()
    with torch.no_grad():
        all_on = model(idx).logits
    groups = peft_block_groups(model)
    seen = {}  # layer -> (its output, its base layer's output on the same input)

    def record(layer, args, output):
        with torch.no_grad():
            seen[layer] = (output.detach(), layer.base_layer(args[0]))

    for layers in groups.values():
        for layer in layers:
            layer.register_forward_hook(record)
    flags = {p: p.requires_grad for p in model.parameters()}
    coto = CoTo(groups, total_steps=20, p0=0.0, seed=0)
    for t in range(3):
        mask = coto.step(t)
        assert not mask.all()
        model.train()
        model(idx, labels=idx).loss.backward()
        for on, layers in zip(mask, groups.values()):
            for layer in layers:
                out, base = seen[layer]
                assert torch.equal(out, base) != bool(on)  # bypassed: exactly the base layer
                assert all((p.grad is None) != bool(on) for p in lora_params(layer).values())
                assert not layer.disable_adapters
        assert {p: p.requires_grad for p in model.parameters()} == flags  # CoTo left no flag changed
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits, all_on, rtol=0, atol=0)  # every adapter on


def test_peft_switch_and_an_optimizer_built_before_training():
    """PEFT's enable_adapters(False) also sets requires_grad=False on the adapter (pinned below).
    CoTo puts every flag back after each forward pass, so an optimizer built from the parameters
    that require grad, before training, holds every adapter; bypassed ones get grad None and AdamW
    leaves them exactly as they were; weights a user froze stay frozen."""
    model = peft_gpt2()
    layer = peft_block_groups(model)["base_model.model.transformer.h.0"][0]
    layer.enable_adapters(False)
    assert not any(p.requires_grad for p in lora_params(layer).values())  # PEFT's own switch does this
    layer.enable_adapters(True)
    randomize_B(model)
    frozen = model.base_model.model.transformer.h[1].attn.c_attn.lora_A["default"].weight
    frozen.requires_grad_(False)  # e.g. a user training only B in one layer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    n_adapter = sum(len(lora_params(l)) for layers in peft_block_groups(model).values() for l in layers)
    assert len(opt.param_groups[0]["params"]) == n_adapter - 1
    groups = peft_block_groups(model)
    coto = CoTo(groups, total_steps=20, p0=0.0, seed=0)
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    masks = []
    for t in range(3):
        mask = coto.step(t)
        masks.append(mask)
        before = {p: p.detach().clone() for p in opt.param_groups[0]["params"]}
        model(idx, labels=idx).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for on, layers in zip(mask, groups.values()):
            for l in layers:
                for p in lora_params(l).values():
                    if p in before:
                        assert torch.equal(p, before[p]) != bool(on)  # moved iff its block was on
        assert not frozen.requires_grad and frozen.grad is None
    assert not all(m[1] for m in masks)  # the frozen weight's block was bypassed at least once


def native_and_peft_pair(tmp_path, variant):
    """The same tiny GPT-2 twice in float64: this project's GPT with LoRALinear, and HF's
    GPT2LMHeadModel under PEFT, with the same adapter initialisation."""
    torch.manual_seed(0)
    ours = GPT(vocab_size=40, n_positions=16, n_embd=24, n_layer=3, n_head=3).double()
    save_hf(ours, tmp_path / "base")
    inject_lora(ours, GPT2_TARGETS, r=2, alpha=4.0, variant=variant)
    mark_only_lora_as_trainable(ours)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").double()
    theirs = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=GPT2_TARGETS,
                                           fan_in_fan_out=True, use_dora=variant == "dora"))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.get_submodule("base_model.model." + name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            if variant == "dora":
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return ours, theirs


def train_with_coto(model, groups, logits_of, steps=8):
    """AdamW with CoTo (p0 = 0, seed 0) on fixed random token batches; returns the masks."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    coto = CoTo(groups, total_steps=steps, p0=0.0, seed=0)
    g = torch.Generator().manual_seed(5)
    masks = []
    model.train()
    for t in range(steps):
        idx = torch.randint(0, 40, (2, 12), generator=g)
        masks.append(coto.step(t).clone())
        logits = logits_of(model, idx)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return torch.stack(masks)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_coto_under_peft_equals_coto_with_lora_py_and_the_adapters_cross_over(tmp_path, variant):
    ours, theirs = native_and_peft_pair(tmp_path, variant)
    masks = train_with_coto(ours, block_groups(ours), lambda m, idx: m(idx))
    assert torch.equal(train_with_coto(theirs, peft_block_groups(theirs), lambda m, idx: m(idx).logits), masks)
    assert not masks.all() and masks.any(dim=1).all()
    worst = 0.0
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.get_submodule("base_model.model." + name)
        pairs = [(layer.lora_A, peft_layer.lora_A["default"].weight),
                 (layer.lora_B, peft_layer.lora_B["default"].weight)]
        if variant == "dora":
            pairs.append((layer.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight))
        for a, b in pairs:
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-9, worst
    assert lora_layers(ours)["transformer.h.0.attn.c_attn"].lora_B.abs().max() > 0.01  # it trained
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(theirs(idx).logits, expected, rtol=0, atol=1e-9)
    # PEFT's file loads here, and ours loads in PEFT, with the same logits
    theirs.save_pretrained(tmp_path / "from_peft")
    here = load_hf(tmp_path / "base").double().eval()
    load_peft_adapter(here, tmp_path / "from_peft")
    save_peft_adapter(ours, tmp_path / "from_here")
    there = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").double(),
                                      tmp_path / "from_here").eval()
    with torch.no_grad():
        torch.testing.assert_close(here(idx), expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(there(idx).logits, expected, rtol=0, atol=1e-9)


def test_active_flag_and_draw_on_peft_layers_and_hooks_attached_once():
    """peft_block_groups gives PEFT's layers what coto.py drives: `active` (every mode) and
    `coto_on` (training mode only), honoured by hooks attached once however often it is called."""
    model = peft_gpt2()
    randomize_B(model)
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    groups = peft_block_groups(model)
    assert peft_block_groups(model) == groups
    layer = groups["base_model.model.transformer.h.1"][0]
    assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(torch.equal(out, m.base_layer(args[0]))))
    model.eval()
    layer.coto_on = False  # CoTo's draw: ignored in eval mode
    model(idx)
    layer.active = False  # the user's switch: honoured in eval mode
    model(idx)
    layer.active, layer.coto_on = True, False
    model.train()
    model(idx)
    assert seen == [False, True, True] and not layer.disable_adapters


def test_a_peft_model_with_every_adapter_disabled_is_refused(tmp_path):
    model = peft_gpt2()
    model.disable_adapter_layers()
    with pytest.raises(ValueError, match=r"disable_adapter_layers\(\).*call model.enable_adapter_layers\(\) first"):
        peft_block_groups(model)
    model.enable_adapter_layers()
    callback = CoToCallback(peft_block_groups(model))
    model.disable_adapter_layers()  # after the callback was made: refused when training starts
    args = TrainingArguments(tmp_path / "out", max_steps=2, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(4, 1), callbacks=[callback])
    with pytest.raises(ValueError, match=r"call model.enable_adapter_layers\(\) first"):
        trainer.train()


def test_a_forward_that_raised_in_a_bypassed_peft_layer_switches_it_back_on():
    model = peft_gpt2()
    groups = peft_block_groups(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    coto = CoTo(groups, total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    layer = list(groups.values())[int((~mask).nonzero()[0])][0]
    model.train()
    with pytest.raises(RuntimeError):  # switched off, then its base layer raises (wrong width)
        layer(torch.randn(2, 5))
    assert not layer.disable_adapters and not layer.coto_switched_off
    assert {p: p.requires_grad for p in model.parameters()} == flags


def test_a_deep_copy_of_a_peft_model_takes_a_coto_of_its_own():
    model = peft_gpt2()
    coto = CoTo(peft_block_groups(model), total_steps=10, p0=0.0, seed=0)
    mask = coto.step(0)
    twin = copy.deepcopy(model)
    assert [l.coto_on for layers in peft_block_groups(twin).values() for l in layers] == \
        [bool(m) for m in mask for _ in range(4)]  # the copy keeps the last draw ...
    own = CoTo(peft_block_groups(twin), total_steps=10)  # ... until a CoTo of its own takes over
    own.remove()
    twin.train()
    before = [l.disable_adapters for layers in own.groups.values() for l in layers]
    twin(torch.randint(0, 40, (1, 8)))
    assert before == [False] * 12
    assert all(l.coto_on is True for l in own.layers)
    assert [l.coto_on for l in coto.layers] == [bool(m) for m in mask for _ in range(4)]  # the original's own


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.idx = torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return {"input_ids": self.idx[i], "labels": self.idx[i]}


def test_trainer_draws_one_mask_per_optimizer_step_and_evaluates_with_every_adapter(tmp_path, monkeypatch):
    model = peft_gpt2()
    randomize_B(model)
    groups = peft_block_groups(model)
    runs = []  # per forward pass: (training?, per group: did its adapters run?)
    current = {}

    def record(layer, args, output):  # bypassed <=> the output is exactly the base layer's
        with torch.no_grad():
            current[layer] = not torch.equal(output, layer.base_layer(args[0]))

    def collect(module, args, output):
        runs.append((module.training, [all(current[l] for l in layers) for layers in groups.values()]))

    for layers in groups.values():
        for layer in layers:
            layer.register_forward_hook(record)
    model.register_forward_hook(collect)
    draws = []
    step = CoTo.step
    monkeypatch.setattr(CoTo, "step", lambda self, t: draws.append(t) or step(self, t))
    args = TrainingArguments(tmp_path / "out", max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, eval_strategy="steps",
                             eval_steps=3, per_device_eval_batch_size=4, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0)
    callback = CoToCallback(groups, p0=0.0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(24, 1), eval_dataset=TokenData(4, 2),
                      callbacks=[callback])
    assert callback in trainer.callback_handler.callbacks
    trainer.train()
    assert draws == list(range(6))  # one draw per optimizer step, not one per micro-batch
    train = [on for training, on in runs if training]
    evals = [on for training, on in runs if not training]
    assert len(train) == 12 and len(evals) == 2
    other = peft_gpt2()  # the same structure: the same masks from the same seed
    reference = CoTo(peft_block_groups(other), total_steps=6, p0=0.0, seed=0)
    expected = [reference.step(t).tolist() for t in range(6)]
    assert train == [m for m in expected for _ in range(2)]  # both micro-batches share the draw
    assert not all(all(m) for m in expected)
    assert all(all(on) for on in evals)  # evaluation: every adapter on
    runs.clear()
    model.train()
    model(torch.randint(0, 40, (1, 8)))
    assert runs == [(True, [True] * 3)]  # after training: CoTo is off, every adapter runs
    assert all(l.coto_on is True for layers in groups.values() for l in layers)


def test_trainer_resumed_from_a_checkpoint_draws_the_uninterrupted_masks(tmp_path, monkeypatch):
    draws = {}
    step = CoTo.step
    monkeypatch.setattr(CoTo, "step", lambda self, t: draws.setdefault(t, []).append(step(self, t).tolist())
                        or self.mask)

    def trainer():
        model = peft_gpt2()
        args = TrainingArguments(tmp_path / "out", max_steps=6, per_device_train_batch_size=2, save_steps=3,
                                 report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no")
        return Trainer(model=model, args=args, train_dataset=TokenData(24, 1),
                       callbacks=[CoToCallback(peft_block_groups(model), p0=0.0, seed=3)])

    trainer().train()
    full = {t: masks[0] for t, masks in draws.items()}
    draws.clear()
    trainer().train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert sorted(draws) == list(range(6))  # steps 0-2 replayed, 3-5 drawn in training
    assert {t: masks[-1] for t, masks in draws.items()} == full
    assert not all(all(m) for m in full.values())


def test_callback_events_and_arguments():
    callback = CoToCallback(peft_block_groups(peft_gpt2()))
    assert callback.on_log(None, None, None, logs={}) is None  # events CoTo does not need are no-ops
    with pytest.raises(AttributeError):
        callback.not_an_event
    with pytest.raises(TypeError, match=r"groups must be a non-empty dict"):
        CoToCallback({"h.0": [torch.nn.Linear(2, 2)]})
    with pytest.raises(ValueError, match=r"p0=2 and stage1_ratio=0.75 must both be in \[0, 1\]"):
        CoToCallback(peft_block_groups(peft_gpt2()), p0=2)
    with pytest.raises(TypeError, match=r"'float' object cannot be interpreted as an integer"):
        CoToCallback(peft_block_groups(peft_gpt2()), seed=1.0)
    with pytest.raises(ValueError, match=r"no PEFT LoRA layers: wrap it with peft.get_peft_model"):
        peft_block_groups(GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=24, n_layer=1, n_head=3)))
    model = peft_gpt2()
    CoToCallback(peft_block_groups(model))  # checks without staying: a CoTo can still drive the layers
    CoTo(peft_block_groups(model), 10).step(0)


def test_readme_peft_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's "after" snippet, executed verbatim on a tiny GPT-2 and token data."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Use it with PEFT\n", 1)[1].split("\n## ", 1)[0]
    after = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "CoToCallback" in after
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=24, n_layer=2, n_head=3,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    scope = {"base_model_path": str(tmp_path / "base"), "train_dataset": TokenData(16, 1),
             "eval_dataset": TokenData(4, 2)}
    exec(compile(after, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 100
    assert (tmp_path / "runs/peft-coto/adapter/adapter_model.safetensors").is_file()
    assert all(m.coto_on is True for m in scope["model"].modules() if hasattr(m, "coto_on"))  # CoTo is off
