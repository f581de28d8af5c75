"""reproduce.py: the t quantile against numerical integration of the t density, p-values against
the closed-form t distribution at 1 and 2 degrees of freedom, Holm's correction, verdicts and the
job plan on hand-made inputs, and tiny end-to-end runs (the table with its controls and change rows,
then --analyse on its saved runs, checked against the table's own cached reports)."""
import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

import train_vit
from lab import reproduce
from lab.reproduce import Config, Plan, holm, holm_rows, interval, p_value, t_quantile, t_within, verdict
from test_train_vit import fake_fashion


def t_within_by_integration(t, df, steps=20000):
    """P(|T| < t) = 2 * integral from 0 to t of the t density (Simpson's rule, float64)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / steps
    return 2 * h / 3 * sum((1 if k in (0, steps) else 4 if k % 2 else 2) * f(k * h) for k in range(steps + 1))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 9, 10, 11, 20, 31, 100])
def test_t_quantile_for_every_degree_of_freedom(df):
    for t in (0.5, 1.7, 3.0):
        assert t_within(t, df) == pytest.approx(t_within_by_integration(t, df), abs=1e-9)
    q = t_quantile(df)
    assert t_within_by_integration(q, df) == pytest.approx(0.95, abs=1e-9)
    # printed t tables (3 decimals); 10 and more degrees of freedom no longer fall back to 1.96
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 7: 2.365, 9: 2.262, 10: 2.228, 11: 2.201, 20: 2.086,
             31: 2.040, 100: 1.984}
    assert round(q, 3) == table[df]


def test_interval_and_verdict_by_hand():
    m, h = interval([0.80, 0.84, 0.82])  # sd 0.02
    assert m == pytest.approx(0.82) and h == pytest.approx(t_quantile(2) * 0.02 / math.sqrt(3))
    xs = [0.5 + 0.01 * k for k in range(12)]  # 11 degrees of freedom: t = 2.201, not 1.96
    sd = math.sqrt(sum((x - sum(xs) / 12) ** 2 for x in xs) / 11)
    assert interval(xs)[1] == pytest.approx(2.200985 * sd / math.sqrt(12), rel=1e-6)
    assert math.isnan(interval([0.5])[1])
    assert verdict((0.03, 0.01), +1) == "holds" and verdict((-0.03, 0.01), +1) == "reversed"
    assert verdict((0.01, 0.02), -1) == "not significant (reversed)"
    assert verdict((-0.01, 0.02), -1) == "not significant (same direction)"
    assert verdict((0.05, 0.01), 0) == "differs"


def test_p_value_and_holm_by_hand():
    # df 2: P(|T| < t) = t / sqrt(2 + t^2); df 1: 2 atan(t) / pi
    t = 0.02 / (0.01 / math.sqrt(3))  # mean 0.02, sd 0.01, n 3
    assert p_value([0.01, 0.03, 0.02]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert p_value([-0.01, -0.03, -0.02]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    t = 0.5 / (math.sqrt(1 / 8) / math.sqrt(2))  # [0.25, 0.75]: mean 0.5, sd sqrt(1/8), n 2
    assert p_value([0.25, 0.75]) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    assert math.isnan(p_value([0.3])) and p_value([0.2, 0.2]) == 0.0 and p_value([0.0, 0.0]) == 1.0
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 12):  # p < 0.05 exactly when the interval excludes 0
        for _ in range(50):
            xs = (torch.randn(n, generator=gen, dtype=torch.float64) + 0.8).tolist()
            m, h = interval(xs)
            assert (p_value(xs) < 0.05) == (abs(m) > h)
    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4 * 0.005, 3 * 0.01, max(2 * 0.03, ...), max(1 * 0.04, 0.06)
    got = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert got[:3] + got[4:] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(got[3])
    assert holm([0.02, 0.9]) == pytest.approx([0.04, 0.9]) and holm([0.6, 0.7, 0.8]) == [1.0, 1.0, 1.0]  # capped at 1
    rows = [{"p": p, "verdict": v, "fmt": "ratio", "diffs": []} for p, v in ((0.01, "holds"), (0.045, "reversed"),
            (0.3, "not significant (same direction)"), (float("nan"), "missing"))]
    assert [r["verdict"] for r in holm_rows(rows)] == ["holds", "reversed, not after Holm",
                                                       "not significant (same direction)", "missing"]
    assert [r["p_holm"] for r in holm_rows(rows)][:3] == pytest.approx([0.03, 0.09, 0.3])


def test_tost_is_the_90_percent_interval_inside_the_margin():
    """TOST's p is the larger one-sided p: exactly 0.05 where an end of the 90 % t interval touches the margin,
    below it exactly when the whole 90 % interval lies inside (-margin, margin)."""
    from lab.reproduce import p_tost
    for n in (2, 3, 6):
        xs = [0.01 * k for k in range(n)]  # mean 0.005 (n - 1), any spread
        m, sd = reproduce.mean_sd(xs)
        h90 = t_quantile(n - 1, 0.90) * sd / math.sqrt(n)
        assert p_tost(xs, abs(m) + h90) == pytest.approx(0.05, abs=1e-9)  # one end on the margin
        assert p_tost(xs, abs(m) + h90 * 1.01) < 0.05 < p_tost(xs, abs(m) + h90 * 0.99)
        # further inside: smaller p; the mean on the margin: p = 1/2
        assert p_tost(xs, abs(m) + 100 * h90) < p_tost(xs, abs(m) + 2 * h90) < 0.05
        assert p_tost(xs, abs(m)) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(p_tost([0.1], 0.03)) and p_tost([0.01, 0.01], 0.03) == 0.0 and p_tost([0.05, 0.05], 0.03) == 1.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the same as the 90 % interval, by brute force over random samples
        xs = (0.02 * torch.randn(6, generator=gen, dtype=torch.float64)).tolist()
        m, sd = reproduce.mean_sd(xs)
        inside = abs(m) + t_quantile(5, 0.90) * sd / math.sqrt(6) < 0.03
        assert (p_tost(xs, 0.03) < 0.05) == inside
    # "equivalent" needs TOST after Holm and no significant difference; a ratio row is not tested
    near = reproduce.row("x", dict.fromkeys(range(6), 0.5), {s: 0.5 + 0.001 * (-1) ** s for s in range(6)}, +1)
    far = reproduce.row("y", dict.fromkeys(range(6), 0.5), {s: 0.5 + 0.1 * (-1) ** s for s in range(6)}, +1)
    ratio = reproduce.row("z", dict.fromkeys(range(6), 1.0), dict.fromkeys(range(6), 1.0), -1, fmt="ratio")
    out = holm_rows([near, far, ratio], margin=0.03)
    assert out[0]["verdict"] == "equivalent (within ±3)" and not out[1]["verdict"].startswith("equivalent")
    assert out[0]["p_tost_holm"] == pytest.approx(min(1, 2 * out[0]["p_tost"])) and math.isnan(out[2]["p_tost"])


def test_rows_pair_seeds_by_id_and_name_the_seeds_used():
    """A side that misses a seed (a failed run) leaves that seed out: the others pair by seed id, not by
    position, and the table's n column names the seeds used."""
    acc = lambda r: r["acc"]  # noqa: E731
    res = {"train": {"s": {"lora": {"t": {"0": {"acc": 0.5}, "1": {"acc": 0.6}, "2": {"acc": 0.7}}},
                           "coto": {"t": {"0": {"acc": 0.6}, "2": {"acc": 0.9}}}}}}
    a, b = (reproduce.per_seed(res, "train", "s", m, acc, [0, 1, 2]) for m in ("lora", "coto"))
    assert a == {0: 0.5, 1: 0.6, 2: 0.7} and b[0] == 0.6 and math.isnan(b[1]) and b[2] == 0.9
    r = reproduce.row("accuracy", a, b, +1)
    assert r["seeds"] == [0, 2] and r["n"] == 2 and r["of"] == [0, 1, 2]
    assert r["diff"] == pytest.approx(interval([0.6 - 0.5, 0.9 - 0.7])) and r["p"] == pytest.approx(p_value([0.1, 0.2]))
    assert r["a"] == pytest.approx(interval([0.5, 0.7])) and r["b"] == pytest.approx(interval([0.6, 0.9]))
    assert reproduce.row("accuracy", {0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.6, 2: 0.9}, +1)["diff"] == r["diff"]
    text = reproduce.markdown([("section", "LoRA", "CoTo", holm_rows([r]))], {}, Config(seeds=3))
    assert "| accuracy | 60.0 ± " in text and " | 2 (seeds 0, 2) | " in text
    # a seed that misses one task's run has no mean over tasks; consecutive seeds are written as a span
    res["train"]["s"]["coto"]["u"] = {str(s): {"acc": 0.5} for s in range(6)}
    two = reproduce.per_seed(res, "train", "s", "coto", acc, [0, 1, 2])  # tasks t and u
    assert two[0] == pytest.approx(0.55) and math.isnan(two[1]) and two[2] == pytest.approx(0.7)
    seven = reproduce.row("x", dict.fromkeys(range(7), 0.5), {**dict.fromkeys(range(6), 0.6), 5: float("nan")}, +1)
    assert reproduce.seed_count(seven) == "5 (seeds 0-4)"
    gaps = reproduce.row("x", dict.fromkeys(range(7), 0.5), {s: 0.6 for s in (0, 1, 2, 3, 5)}, +1)
    assert reproduce.seed_count(gaps) == "5 (seeds 0-3, 5)"
    assert reproduce.seed_count(reproduce.row("x", {0: 0.5, 1: 0.5}, {0: 0.6, 1: 0.7}, +1)) == "2"


class PlanOnly:
    """A Context that builds nothing: enough for plan() to list the jobs."""
    n_eval = 500

    def tasks(self, vcfg):
        return dict.fromkeys(("new5", "rot90"))


def test_plan_pairs_seeds_disjointly_and_rescales_after_training():
    cfg = Config(seeds=5, tasks="new5,rot90", studies="full,baselines")
    p, index = reproduce.plan(cfg, PlanOnly())
    pairs = {(study, setting, seed) for kind, study, setting, _, seed, _ in index if kind == "pair"}
    settings = ["lora", "coto"] + ["layer drop p=0.625", "lora dropout 0.1", "progressive dropout 0.1",
                                   reproduce.RESCALED]
    assert {s for _, s, _ in pairs} == set(settings) and {seed for *_, seed in pairs} == {0, 2}
    assert sum(label.startswith("interpolate full/lora/new5/seeds ") for label, *_ in p.jobs) == 2
    labels = [label for label, *_ in p.jobs]
    rescale = [i for i, label in enumerate(labels) if label.startswith("rescale ")]
    assert len(rescale) == 10  # 2 tasks x 5 seeds, after every full-regime run they read
    assert max(i for i, label in enumerate(labels) if label.startswith("train full/")) < min(rescale)
    assert not any(label.startswith(f"train baselines/{reproduce.RESCALED}") for label in labels)
    with pytest.raises(ValueError, match="add full to --studies"):
        reproduce.main(Config(studies="baselines", out_dir="/nonexistent/never-written"))  # before any work
    for bad, message in (({"long_task": "rot91"}, "--long-task 'rot91': unknown task 'rot91'"),
                         ({"tasks": "new5,inverted"}, "unknown task 'inverted'"),
                         ({"long_steps": 0}, "--long-steps 0: must be an integer >= 1"),
                         ({"n_eval": -1}, "--n-eval -1: must be an integer >= 1"),
                         ({"n_eval": 3000}, "--n-eval 3000: at most --n-test 2000"),
                         ({"lrs": "abc"}, "--lrs 'abc': write learning rates > 0"),
                         ({"vit": "{depth: 4}"}, "--vit '{depth: 4}': write a JSON object"),
                         ({"value": "loss"}, "--value 'loss': choose acc or neg_loss"),
                         ({"vit": '{"variant": "lorra"}'}, "unknown variant 'lorra': choose one of lora, dora, hira"),
                         ({"vit": '{"depht": 4}'}, "--vit '{\"depht\": 4}': ")):
        with pytest.raises(ValueError, match=re.escape(message)):
            reproduce.main(Config(out_dir="/nonexistent/never-written", **bad))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: not a device this torch has here"):
            reproduce.main(Config(out_dir="/nonexistent/never-written", device="cuda"))


def test_plan_resumes_where_it_stopped_and_keeps_job_output_back(tmp_path, capsys):
    calls = []

    def job(i, fail=False):
        def fn():
            print(f"training log of job {i}")
            if fail:
                raise KeyboardInterrupt  # the user stops the run here
            calls.append(i)
            return {"i": i}
        return fn

    def plan(fail_at):
        p = Plan()
        for i in range(5):
            p.add(f"job {i}", "train" if i % 2 else "adapter", 1.0, tmp_path / f"{i}.json", job(i, i == fail_at))
        return p

    with pytest.raises(KeyboardInterrupt):
        plan(fail_at=3).run()
    out = capsys.readouterr().out
    assert calls == [0, 1, 2] and not (tmp_path / "3.json").exists()
    assert "[3/5] job 2" in out and "training log of job 2" not in out  # a job's output is kept back...
    assert "training log of job 3" in out  # ...unless it fails
    plan(fail_at=None).run()
    assert calls == [0, 1, 2, 3, 4]  # only the missing jobs ran
    assert [json.loads((tmp_path / f"{i}.json").read_text())["i"] for i in range(5)] == list(range(5))
    assert "5 jobs, 3 cached, 2 to run" in capsys.readouterr().out


TINY_VIT = json.dumps({"depth": 3, "embed_dim": 16, "num_heads": 2, "n_train": 48,
                       "batch_size": 16, "warmup": 0, "ckpt_every": 0})


def tiny(tmp_path, **kw):
    """A tiny table on the fake Fashion-MNIST in tmp_path/data (test_train_vit's)."""
    data = tmp_path / "data"
    kw.setdefault("data_dir", str(data) if data.is_dir() else fake_fashion(data))
    return Config(out_dir=str(tmp_path / "repro"), seeds=2, tasks="new5,rot90", studies="full,baselines,dynamics,ramps",
                  steps=6, long_steps=8, lr=0.1, pretrain_steps=6, n_test=30, n_eval=20, lrs="1e-2", vit=TINY_VIT, device="cpu", **kw)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """One tiny table (2 tasks, 2 seeds, the "full", "baselines" and "dynamics" studies), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("reproduce")
    return tmp_path, reproduce.main(tiny(tmp_path))


def test_tiny_table_end_to_end(table_run, tmp_path, capsys):
    path, res = table_run
    root = path / "repro"
    written = {p.name for p in root.iterdir()}
    assert {"results.json", "table.md", "pruning.png", "interpolation.png", "combining.png", "dynamics.png"} <= written
    title, _, _, rs = res["table"][0]
    assert title == "Regime: full data, learned head"
    rows = {r["claim"]: r for r in rs}
    acc = [json.loads((root / "runs/full" / t / "lora" / f"seed{s}" / "summary.json").read_text())["acc"]
           for s in range(2) for t in ("new5", "rot90")]
    assert rows["1. accuracy, mean over tasks"]["a"][0] == pytest.approx(sum(acc) / 4)
    assert "(seeds " not in res["markdown"]  # every seed present: the n column is the count alone
    # a table of some studies shows only their rows: no LR sweep, no DoRA / HiRA rows without their studies
    titles = {title: [r["claim"] for r in rs] for title, _, _, rs in res["table"]}
    assert "Learning-rate sweep (accuracy, full data)" not in titles and "Ablations (accuracy, full data)" not in titles
    assert titles["Training cost (time per step at equal steps) and variants"] == [
        "6. wall-clock per step, CoTo / LoRA, lora"]
    reproduce.main(tiny(path))  # again: everything cached, nothing printed by training
    out = capsys.readouterr().out
    assert "0 to run" in out and "trainable params" not in out and "tabulating" in out
    with pytest.raises(ValueError, match="another configuration"):
        reproduce.main(dataclasses.replace(tiny(path), steps=4))


def test_change_rows_and_controls_from_the_cached_reports(table_run):
    path, res = table_run
    root = path / "repro"
    sections = {title: rows for title, _, _, rows in res["table"]}
    full = sections["Regime: full data, learned head"]
    claims = [r["claim"] for r in full]
    i = claims.index("4. structured pruning, keep every other")
    assert claims[i + 1] == "   change from the unpruned adapter (after − before)"
    change = {}  # per seed: the mean over tasks of after - before
    for method in ("lora", "coto"):
        reports = [[json.loads((root / "analysis/full" / method / t / f"seed{s}.json").read_text())
                    for t in ("new5", "rot90")] for s in range(2)]
        change[method] = [sum(r["structured"]["every_other"] - r["full"] for r in rs) / 2 for rs in reports]
    assert full[i + 1]["a"] == pytest.approx(interval(change["lora"]))
    assert full[i + 1]["b"] == pytest.approx(interval(change["coto"]))
    paired = [c - l for l, c in zip(change["lora"], change["coto"])]
    assert full[i + 1]["diff"] == pytest.approx(interval(paired))
    assert full[i + 1]["p"] == pytest.approx(p_value(paired), nan_ok=True)
    assert "   change from the two ends' mean (after − before)" in claims
    assert "2. seed interpolation at λ = 0.5, factors, head of one seed held" in claims
    assert "4. unstructured pruning, 50% of each A and B" in claims
    controls = [t for t in sections if t.startswith("Control: ")]
    assert len(controls) == 4 and f"Control: {reproduce.RESCALED}, against CoTo (full data, learned head)" in controls
    assert all(len(sections[t]) == len(full) for t in controls)  # analysed like LoRA and CoTo
    assert "Rows tested: 40 (Holm's correction over them)" in res["markdown"] and "| p (Holm) |" in res["markdown"]
    # the head alone: the reports' v(none), every adapter bypassed, mean over tasks per seed
    alone = full[claims.index("1. the head alone: every adapter bypassed (held-out images)")]
    none = [sum(json.loads((root / "analysis/full/coto" / t / f"seed{s}.json").read_text())["none"]
                for t in ("new5", "rot90")) / 2 for s in range(2)]
    assert alone["b"] == pytest.approx(interval(none))
    assert "3. multi-task merge, ensemble" in claims and "| TOST p (Holm), ±3 |" in res["markdown"]
    # the rescaled control: LoRA's A, and B scaled so that each layer's B A has CoTo's norm
    folder = lambda study, m: reproduce.run_folder(tiny(path), study, m, "rot90", 1)  # noqa: E731
    files = {m: reproduce.read_adapters(folder(study, m))["state"]
             for study, m in (("full", "lora"), ("full", "coto"), ("baselines", reproduce.RESCALED))}
    lora, rescaled = files["lora"], files[reproduce.RESCALED]
    assert torch.equal(rescaled["head.weight"], lora["head.weight"])
    for key in (k for k in lora if k.endswith("lora_A")):
        layer = key[:-len("lora_A")]
        ba = {m: (f[layer + "lora_B"].double() @ f[layer + "lora_A"].double()) for m, f in files.items()}
        assert torch.equal(rescaled[key], lora[key])
        assert ba[reproduce.RESCALED].norm().item() == pytest.approx(ba["coto"].norm().item(), rel=1e-5)


def test_a_missing_run_leaves_its_seed_out_of_the_rows_that_need_it(table_run):
    """The tiny table tabulated again without one CoTo run (rot90, seed 1): its rows pair seed 0 alone and say so."""
    path, _ = table_run
    res = json.loads((path / "repro/results.json").read_text())["runs"]
    del res["train"]["full"]["coto"]["rot90"]["1"]
    table = reproduce.sections(res, tiny(path))
    rows = {r["claim"]: r for r in dict((t, rs) for t, _, _, rs in table)["Regime: full data, learned head"]}
    assert rows["1. accuracy, rot90"]["seeds"] == rows["1. accuracy, mean over tasks"]["seeds"] == [0]
    assert rows["1. accuracy, new5"]["seeds"] == [0, 1]
    acc = {m: res["train"]["full"][m]["rot90"]["0"]["acc"] for m in ("lora", "coto")}
    assert rows["1. accuracy, rot90"]["diff"][0] == pytest.approx(acc["coto"] - acc["lora"])
    text = reproduce.markdown(table[:1], {}, tiny(path))  # the full regime's section
    assert [line.split(" | ")[4] for line in text.splitlines() if line.startswith("| 1. accuracy")] == [
        "2", "1 (seeds 0)", "1 (seeds 0)"]


def test_dynamics_rows_and_curves_from_the_runs_files(table_run):
    """The training-length section pairs each CoTo ramp with LoRA by seed; the figure's curves are
    the seeds' mean of each run's metrics.jsonl records (evaluations every long_steps // 15 steps)."""
    path, res = table_run
    cfg = tiny(path)
    rows = {r["claim"]: r for r in dict((t, rs) for t, _, _, rs in res["table"])[
        "Training length: rot90, 8 steps (full data, learned head)"]}
    study = lambda m: "ramps" if "shape" in m else "dynamics"  # noqa: E731
    summary = lambda m, s: json.loads((reproduce.run_folder(cfg, study(m), m, "rot90", s)  # noqa: E731
                                       / "summary.json").read_text())
    for m in ("coto", "coto shape=exp", "coto shape=sine"):
        lora, coto = ([summary(x, s)["acc"] for s in range(2)] for x in ("lora", m))
        assert rows[f"accuracy, {m}"]["diff"] == pytest.approx(interval([c - a for a, c in zip(lora, coto)]))
    loss = [summary("coto", s)["train_loss_last"] for s in range(2)]
    assert rows["   training loss of the last 1 steps, coto"]["b"] == pytest.approx(interval(loss))
    curves = reproduce.plot_dynamics(cfg, path / "dynamics.png")
    records = [[json.loads(line) for line in (reproduce.run_folder(cfg, "ramps", "coto shape=sine", "rot90", s)
                                              / "metrics.jsonl").read_text().splitlines()] for s in range(2)]
    evals = [[r["eval_acc"] for r in rs if "eval_acc" in r] for rs in records]
    assert curves["coto shape=sine"]["eval"] == (list(range(1, 9)), pytest.approx([(a + b) / 2 for a, b in zip(*evals)]))
    assert loss[1] == [r["loss"] for r in json.loads((reproduce.run_folder(cfg, "dynamics", "coto", "rot90", 1)
                                                      / "result.json").read_text())["history"]][-1]
    # the long runs analysed like the full regime: one task, so no merging rows
    long = [r["claim"] for r in dict((t, rs) for t, _, _, rs in res["table"])[
        "Regime: rot90 alone, 8 steps (full data, learned head)"]]
    assert "2. interpolation barrier, factors" in long and not any(c.startswith("3.") for c in long)


def test_analyse_reads_each_runs_config_from_its_result_json(table_run, tmp_path, capsys):
    path, _ = table_run
    runs = path / "repro" / "runs" / "full"
    results = reproduce.main(Config(analyse=str(runs), n_eval=20, device="cpu"))
    cached = json.loads((path / "repro/analysis/full/lora/new5/seed0.json").read_text())  # the table's own
    assert results["lora"]["adapters"][0] == cached and len(results["lora"]["adapters"]) == 4  # lora/new5/seed0
    assert len(set(json.dumps(r["shapley"]) for r in results["lora"]["adapters"])) == 4  # four different runs
    assert len(results["coto"]["pairs"]) == 2 and len(results["coto"]["combinations"]) == 2
    assert (runs / "games" / "games.json").is_file() and (runs / "games" / "pruning.png").is_file()
    assert "0 to run" not in capsys.readouterr().out
    reproduce.main(Config(analyse=str(runs), n_eval=20, device="cpu"))
    assert "0 to run" in capsys.readouterr().out  # cached
    modules = reproduce.main(Config(analyse=str(runs), n_eval=20, device="cpu", players="module", num_samples=2))
    names = modules["coto"]["modules"][0]["names"]  # one player per adapted module: 3 blocks x 4 targets
    assert len(names) == 12 and names[:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    # folder names mean nothing: one run, moved to a folder named like no method, task or seed
    shutil.copytree(runs / "new5" / "coto" / "seed1", tmp_path / "x" / "y")
    results = reproduce.main(Config(analyse=str(tmp_path), n_eval=20, device="cpu"))
    out = capsys.readouterr().out
    assert len(results["coto"]["adapters"]) == 1 and not results["lora"]["adapters"]
    assert "no interpolation for coto/new5: it needs two seeds of a task" in out
    with pytest.raises(FileNotFoundError, match="no finished lora runs"):
        reproduce.main(Config(analyse=str(tmp_path), methods="lora", device="cpu"))


def test_quick_says_it_is_a_smoke_test(capsys):
    cfg = reproduce.quick_config(Config(quick=True))
    assert reproduce.QUICK in reproduce.markdown([], {}, cfg)
    assert reproduce.QUICK not in reproduce.markdown([], {}, Config())
    # the table names the command that makes it: every flag that differs from the defaults (of --quick)
    assert reproduce.markdown([], {}, Config()).startswith("Generated by `python -m lab.reproduce`:")
    six = Config(seeds=6, studies="full,baselines", vit='{"depth": 4}', out_dir="elsewhere")
    assert reproduce.markdown([], {}, six).startswith("Generated by `python -m lab.reproduce --seeds 6 --studies "
                                                      "full,baselines --vit '{\"depth\": 4}'`:")
    assert reproduce.markdown([], {}, cfg).startswith("Generated by `python -m lab.reproduce --quick`:")
    assert "smoke test" in reproduce.QUICK and "mean anything" in reproduce.QUICK


def test_a_folder_of_other_data_or_a_damaged_file_is_refused_by_name(table_run, tmp_path):
    """The runs of a folder are tied to the data's hash (the same flags on other images are other runs); a
    damaged config.json or cached report names itself; a finished run whose adapters were deleted is trained again."""
    path, _ = table_run
    root = tmp_path / "repro"
    shutil.copytree(path / "repro", root)
    other = fake_fashion(tmp_path / "other", seed=1)  # other images (the folder's name is not part of it)
    with pytest.raises(ValueError, match=r"holds results of another configuration \(differs in \['data_sha1'\]\)"):
        reproduce.main(tiny(tmp_path, data_dir=other))
    (root / "config.json").write_text('{"seeds": 2, "tas')
    with pytest.raises(ValueError, match=rf"{root / 'config.json'} is damaged .*delete it"):
        reproduce.main(tiny(tmp_path))
    shutil.copy(path / "repro" / "config.json", root / "config.json")
    run = reproduce.run_folder(tiny(tmp_path), "full", "coto", "rot90", 1)
    (run / "adapters.pt").unlink()
    p, _ = reproduce.plan(tiny(tmp_path), reproduce.Context(reproduce.vit_config(tiny(tmp_path), {}, 0), ["new5", "rot90"], 20))
    assert [label for label, _, _, file, _ in p.jobs if not file.is_file()] == ["train full/coto/rot90/seed1"]


def test_the_matched_control_trains_the_length_nearest_cotos_validation_accuracy(tmp_path):
    """Per task: seed-0 LoRA at each --matched-steps length and seed-0 CoTo scored on validation images
    outside the training subset; every seed of the control trains the nearest length."""
    cfg = dataclasses.replace(tiny(tmp_path, matched_steps="2,5", n_val=20), studies="full,matched")
    res = reproduce.main(cfg)
    root = tmp_path / "repro"
    ctx = reproduce.Context(reproduce.vit_config(cfg, {}, 0), ["new5", "rot90"], cfg.n_eval, n_val=cfg.n_val)
    vcfg = reproduce.vit_config(cfg, {}, 0)
    titles = [title for title, *_ in res["table"]]
    for t in ("new5", "rot90"):
        choice = json.loads((root / "runs/matched" / t / "select.json").read_text())
        grid, target = choice["lora_val_acc"], choice["coto_val_acc"]
        assert set(grid) == {"2", "5"} and choice["steps"] == int(min(grid, key=lambda k: abs(grid[k] - target)))
        x_val, y_val = ctx.validation(vcfg, t)
        coto = ctx.model(vcfg, ctx.tasks(vcfg)[t], reproduce.run_folder(cfg, "full", "coto", t, 0))
        assert target == train_vit.evaluate(coto, x_val, y_val)[0]
        train = {bytes(x.numpy()) for x in ctx.tasks(vcfg)[t].x_train}
        assert len(x_val) == 20 and not any(bytes(x.numpy()) in train for x in x_val)  # never a training image
        for s in range(2):
            folder = reproduce.run_folder(cfg, "matched", reproduce.MATCHED, t, s)
            assert json.loads((folder / "summary.json").read_text())["steps"] == choice["steps"]
            assert json.loads((folder / "result.json").read_text())["config"]["steps"] == choice["steps"]
    steps = {t: json.loads((root / "runs/matched" / t / "select.json").read_text())["steps"] for t in ("new5", "rot90")}
    assert (f"Control: {reproduce.MATCHED} (new5: {steps['new5']} steps, rot90: {steps['rot90']} steps), against CoTo "
            "(full data, learned head)") in titles
    with pytest.raises(ValueError, match="the matched study is set against the full study's runs"):
        reproduce.studies(dataclasses.replace(cfg, studies="matched"))
    for n_train in (0, 10 ** 6):  # 0: every training image is a training image, none is left to validate on
        with pytest.raises(ValueError, match="the matched control needs --n-val 20 validation images of new5"):
            ctx.validation(dataclasses.replace(vcfg, n_train=n_train), "new5")
    with pytest.raises(ValueError, match="--matched-steps '60,x'"):
        dataclasses.replace(cfg, matched_steps="60,x")


def test_the_regimes_and_the_ramp_control():
    """probe_init and the frozen probe run on every task; the constant-rate control has CoTo's mean
    exposure (p = 0.5 over the first 75 % of steps, then 1) and differs from it only in the ramp."""
    from coto import coto_prob
    found = {name: (settings, tasks) for name, settings, tasks, _ in reproduce.studies(Config())}
    assert found["probe_init"][0]["coto"] == {"head": "probe_init", "coto": True}
    assert found["probe"][1] == found["probe_init"][1] == found["full"][1] == Config().tasks.split(",")
    control = found["controls"][0]["constant p=0.5, then all on"]
    steps = 1000
    ramp = [coto_prob(t, steps) for t in range(steps)]
    flat = [coto_prob(t, steps, p0=control["p0"], shape=control["shape"]) for t in range(steps)]
    assert flat[0] == flat[749] == 0.5 and flat[750] == flat[-1] == ramp[-1] == 1.0
    assert sum(flat) / steps == pytest.approx(sum(ramp) / steps, abs=1e-3) == pytest.approx(0.625, abs=1e-3)
    assert {o["lora_dropout"] for s, o in found["controls"][0].items() if "dropout" in s} == {0.25}


def test_the_overview_copies_the_sections_cells(table_run):
    """One line per regime and control: the B − A of the accuracy and head-alone rows, and of the change rows
    under the merging and pruning claims, each marked as its section's Holm and TOST verdicts say."""
    _, res = table_run
    sections = {title: rows for title, _, _, rows in res["table"]}
    lines = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in res["markdown"].splitlines()
             if line.startswith("| full data, learned head (LoRA → CoTo) |") or line.startswith("| layer drop")}
    full = sections["Regime: full data, learned head"]
    claims = [r["claim"] for r in full]
    cells = lines["full data, learned head (LoRA → CoTo)"]
    acc = full[claims.index("1. accuracy, mean over tasks")]
    every_other = full[claims.index("4. structured pruning, keep every other") + 1]  # its change row
    for cell, r in ((cells[0], acc), (cells[5].rstrip(" |"), every_other)):
        assert cell.split(" *")[0].split(" ≈")[0] == reproduce.fmt(r["diff"], "pct")
        assert cell.endswith(" *") == (r["p_holm"] < 0.05)
    assert len(lines) == 2 and len(cells) == len(reproduce.OVERVIEW)
