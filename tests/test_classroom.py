"""The classroom stays a classroom: its six files import only the standard library, torch, numpy,
matplotlib and each other; lora.py and coto.py each work copied alone; the product cites no file
a user does not have."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CLASSROOM = ("lora", "coto", "games", "vit", "train_toy", "train_vit")
ALLOWED = set(sys.stdlib_module_names) | {"torch", "numpy", "matplotlib", *CLASSROOM}


def imports(path: Path) -> list:
    """(line, top-level module) of every import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # a relative import (level > 0) is a package's, never the classroom's
            found.append((node.lineno, "." * node.level + (node.module or "").split(".")[0]))
    return found


def test_imports_finds_every_form(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os, lab.bench\nfrom lab import utils\nfrom . import y\n"
                 "def f():\n    import peft\n    from torch import nn\n")
    assert imports(f) == [(1, "os"), (1, "lab"), (2, "lab"), (3, "."), (5, "peft"), (6, "torch")]


@pytest.mark.parametrize("name", CLASSROOM)
def test_the_classroom_imports_nothing_outside_it(name):
    outside = [f"{name}.py:{line} imports {mod}" for line, mod in imports(ROOT / f"{name}.py") if mod not in ALLOWED]
    assert not outside, "the classroom imports only the standard library, torch, numpy, matplotlib and " \
                        f"its own files (the lab may import the classroom, never the reverse): {outside}"


CHECKS = {
    # LoRA's formula against the layer, in float64: base(x) + scaling * B A x
    "lora": """
import torch, lora
base = torch.nn.Linear(6, 5).double()
layer = lora.LoRALinear(base, r=2, alpha=4).double().eval()
torch.nn.init.normal_(layer.lora_B)
x = torch.randn(3, 6, dtype=torch.float64)
want = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
assert torch.allclose(layer(x), want, rtol=1e-12, atol=1e-12), (layer(x) - want).abs().max()
""",
    # the schedule: p(t) = min(p0 + (1 - p0) t / ceil(0.75 T), 1)
    "coto": """
import coto
assert abs(coto.coto_prob(30, 100) - 30 / 75) < 1e-12
assert abs(coto.coto_prob(30, 100, p0=0.1) - (0.1 + 0.9 * 30 / 75)) < 1e-12
assert coto.coto_prob(75, 100) == 1.0
""",
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_copied_alone_into_another_project(name, tmp_path):
    """The file alone in a folder, that folder the only project path (python -I: no PYTHONPATH, no
    current directory): it imports, computes right, and loads no other project file."""
    (tmp_path / f"{name}.py").write_text((ROOT / f"{name}.py").read_text())
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + CHECKS[name] + f"""
others = set(sys.modules) & {set(CLASSROOM) - {name} | {"lab"}!r}
assert not others, f"{name}.py loaded {{sorted(others)}}"
assert sys.modules[{name!r}].__file__.startswith({str(tmp_path)!r})
print("ok")
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_product_cites_no_file_users_do_not_have():
    """The development notes are not in the repository: cite the paper's sections or the README."""
    names = ("method" + ".md", "style" + ".md")  # split, so that this file does not cite them either
    product = [*ROOT.glob("*.py"), *ROOT.glob("lab/*"), *ROOT.glob("*.md"), *ROOT.glob("requirements*.txt")]
    cites = [f"{p.relative_to(ROOT)}:{i}" for p in product if p.is_file()
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(n in line for n in names)]
    assert not cites, f"cite the paper (arXiv 2506.05713, its section) or the README instead: {cites}"


def test_every_readme_command_carries_its_thread_setting():
    """Two threads on two busy cores spin against each other (GPT-2 took 11.5 min without the
    setting, 5 with it), and the numbers in RESULTS.md were printed with one thread."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"(\S*) *python (?:-m )?(?:train_toy\.py|train_vit\.py|pytest|lab\.(?:train_gpt2|reproduce|bench))"
                          r"([^\n`]*)", readme)
    assert len(commands) >= 10
    bare = [f"python ...{rest}" for before, rest in commands if before.lstrip("`(") != "OMP_NUM_THREADS=1" and "--device cuda" not in rest]
    assert not bare, f"prefix OMP_NUM_THREADS=1: {bare}"


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    """The README's before / after snippets, verbatim, on a tiny ViT: the adapters train and are saved."""
    import torch
    import torch.nn.functional as F
    from vit import VisionTransformer

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it in your project\n", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 2 and "coto.step(step)" in snippets[1]
    monkeypatch.chdir(tmp_path)
    make = lambda: VisionTransformer(embed_dim=24, depth=2, num_heads=2)
    torch.manual_seed(0)
    torch.save(make().state_dict(), "pretrained.pt")
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    for code in snippets:
        scope = {"torch": torch, "F": F, "MyViT": make, "loader": loader, "evaluate": lambda model: None}
        exec(compile(code, "README.md", "exec"), scope)
    saved = torch.load("adapter.pt")
    assert len(saved["state"]) == 2 * 4 * 2  # A and B of qkv, proj, fc1, fc2 in 2 blocks
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in saved["state"].items())  # B left zero: it trained
    assert saved["metadata"] == {"variant": "lora", "r": "8", "alpha": "16.0", "scaling": "2.0"}
    assert len(scope["coto"].groups) == 2
