"""demo.py end to end in its tiny preset: every stage through the public commands, seeds, the table, resume."""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TRAINED = ["dense_continued", "naive_retrain", "gmp", "imp", "ast_naive", "ast_boosted"]
ONESHOT = ["oneshot_magnitude", "oneshot_wanda", "oneshot_wanda_recon", "oneshot_sparsegpt"]
# data (3), teacher, export, eval; one-shot and their curve references, the teacher's; trained x 2 seeds; samples
STAGES = 6 + 2 * len(ONESHOT) + 1 + 2 * len(TRAINED) + 3


def run_demo(out_dir, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "demo.py"), "--preset", "tiny", "--quiet",
                           "--out_dir", str(out_dir), *extra], capture_output=True, text=True, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def demo_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_demo(out, "--data_root", data_root, "--seeds", "2", "--jobs", "2", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def table_rows(summary):
    """The table without what may differ between two runs of the same code (wall times, folders)."""
    return [{k: v for k, v in r.items() if k not in ("wall_seconds", "sources")} for r in summary["rows"]]


def test_demo_table_has_every_method_and_every_sparse_result_is_2_4(demo_run):
    out, proc = demo_run
    summary = json.load(open(out / "results.json"))
    keys = [r["key"] for r in summary["rows"]]
    assert keys == ["teacher", "dense_continued", "oneshot_magnitude", "oneshot_wanda", "oneshot_wanda_recon",
                    "oneshot_sparsegpt",
                    "naive_retrain", "gmp", "imp", "ast_naive", "ast_boosted"]
    for row in summary["rows"]:
        assert row["wikitext_ppl"]["mean"] > 1 and row["val_loss"]["mean"] > 0
        assert row["seeds"] == ([0, 1] if row["key"] in TRAINED else None)
        if row["key"] in ("teacher", "dense_continued"):
            assert row["nm_ok"] is None and row["mean_sparsity"] == 0
        else:
            assert row["nm_ok"] is True and row["mean_sparsity"] == pytest.approx(0.5)
    trained = [r for r in summary["rows"] if r["training"].startswith("yes")]
    assert len({r["tokens"] for r in trained}) == 1 and trained[0]["tokens"] > 0  # equal token budgets
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 12 + 1 + len(summary["comparisons"]) and "AST-Boosted" in md and "2:4 ✓" in md
    assert "main.py" in proc.stdout and "prune.py" in proc.stdout and "sample.py" in proc.stdout
    machine = summary["machine"]
    assert machine["torch"] and machine["cpu"] and machine["threads_per_process"] == 1 and machine["jobs"] == 2
    assert len(machine["git_commit"]) == 40 and machine["git_commit"][:12] in md and machine["cpu"] in md


def test_demo_spread_and_paired_differences_match_the_per_seed_results(demo_run):
    """Recomputed here from each seed's own results.json (main.py's final evaluation) and the one-shot files."""
    out, _ = demo_run
    summary = json.load(open(out / "results.json"))
    ppl = {m: [json.load(open(out / m / f"seed{s}" / "results.json"))["wikitext_ppl"] for s in (0, 1)]
           for m in TRAINED}
    val = {m: [json.load(open(out / m / f"seed{s}" / "results.json"))["val_loss"] for s in (0, 1)] for m in TRAINED}
    for m in ONESHOT:
        one = json.load(open(out / m / "results.json"))
        ppl[m], val[m] = [one["wikitext_ppl"]] * 2, [one["val_loss"]] * 2
    rows = {r["key"]: r for r in summary["rows"]}
    for m in TRAINED:
        a, b = ppl[m]
        assert rows[m]["per_seed"]["wikitext_ppl"] == [a, b]
        assert rows[m]["wikitext_ppl"]["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
        assert rows[m]["wikitext_ppl"]["sd"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9)
        assert rows[m]["wikitext_ppl"]["sd"] > 0  # the seed changes the data order, so the result
        control = ppl["dense_continued"]
        assert rows[m]["per_seed"]["ppl_vs_control"] == pytest.approx([a / control[0], b / control[1]])
    assert {(c["a"], c["b"]) for c in summary["comparisons"]} >= {("ast_boosted", "ast_naive"),
                                                                   ("ast_naive", "naive_retrain"),
                                                                   ("ast_naive", "gmp"), ("ast_naive", "imp")}
    for c in summary["comparisons"]:
        rel = [x / y - 1 for x, y in zip(ppl[c["a"]], ppl[c["b"]])]
        diff = [x - y for x, y in zip(val[c["a"]], val[c["b"]])]
        if c["a"] in ONESHOT and c["b"] in ONESHOT:  # two single runs: one difference, no spread to beat
            assert c["wikitext_ppl_rel"]["per_seed"] == pytest.approx(rel[:1]) and c["wikitext_ppl_rel"]["sd"] is None
            assert c["wikitext_ppl_rel"]["holds"] is None and c["val_loss_diff"]["holds"] is None
            continue
        for got, want in ((c["wikitext_ppl_rel"], rel), (c["val_loss_diff"], diff)):
            assert got["per_seed"] == pytest.approx(want, rel=1e-9, abs=1e-15)
            mean, sd = sum(want) / 2, abs(want[0] - want[1]) / math.sqrt(2)
            assert got["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-15)
            assert got["sd"] == pytest.approx(sd, rel=1e-9, abs=1e-15)
            assert got["holds"] == ((want[0] > 0) == (want[1] > 0) and want[0] != 0 and abs(mean) > 2 * sd)


def test_demo_gives_identical_tables_whether_its_one_thread_stages_run_in_parallel_or_not(demo_run, data_root,
                                                                                         tmp_path):
    """Two one-thread processes at a time, or one: the same table. (Threads per process are part of the recipe:
    two torch threads split floating-point sums differently and change the last digits.)"""
    out, _ = demo_run
    # the same folder with the stages that ran side by side with others removed (the reconstruction and its curve
    # reference, both distilled methods' seed 0, the samples), rerun one stage at a time: those stages run again
    again = tmp_path / "again"
    shutil.copytree(out, again)
    redone = [again / "oneshot_wanda_recon", again / "curve_refs" / "oneshot_wanda_recon.json",
              again / "ast_naive" / "seed0", again / "ast_boosted" / "seed0", again / "samples"]
    for path in redone:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = run_demo(again, "--data_root", data_root, "--seeds", "2", "--jobs", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped") == STAGES - (2 + 2 + 3)
    first, second = json.load(open(out / "results.json")), json.load(open(tmp_path / "again" / "results.json"))
    assert second["machine"]["threads_per_process"] == 1 and second["machine"]["jobs"] == 1
    assert table_rows(first) == table_rows(second)
    assert first["comparisons"] == second["comparisons"]
    assert [s["samples"] for s in first["samples"]] == [s["samples"] for s in second["samples"]]


def test_demo_rerun_skips_finished_stages_and_gives_the_same_table(demo_run, data_root):
    out, _ = demo_run
    before = json.load(open(out / "results.json"))
    proc = run_demo(out, "--data_root", data_root, "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    stages = STAGES
    assert proc.stdout.count("skipped") == stages and "$ " not in proc.stdout
    assert table_rows(json.load(open(out / "results.json"))) == table_rows(before)


def test_demo_logs_start_with_their_command_hold_no_progress_bars_and_no_repeated_flag(demo_run):
    out, _ = demo_run
    logs = sorted((out / "logs").iterdir())
    assert len(logs) == STAGES
    for log in logs:
        text = log.read_text()
        first = text.splitlines()[0]
        assert first.startswith("$ ") and "# demo.py preset tiny" in text, log.name
        assert "\r" not in text and "it/s" not in text, log.name  # tqdm draws with carriage returns
        # the data scripts take one --input / --val_files per file; any other flag appears once
        flags = [a for a in shlex.split(first[2:]) if a.startswith("--") and a not in ("--input", "--val_files")]
        assert len(flags) == len(set(flags)), (log.name, sorted(f for f in flags if flags.count(f) > 1))
    train_log = (out / "logs" / "ast_boosted_seed1.log").read_text()
    config = json.loads(next(line for line in train_log.splitlines() if line.startswith("config: "))[8:])
    assert config["seed"] == 1 and config["SLoRB"] is True  # main.py prints the config it runs with


def test_demo_curves_have_the_teacher_and_one_shot_reference_lines_on_the_curves_windows(demo_run):
    out, _ = demo_run
    summary = json.load(open(out / "results.json"))
    assert open(out / "curves.png", "rb").read(4) == b"\x89PNG"
    data = json.load(open(out / "curves.json"))
    panels = {p["key"]: p for p in data["panels"]}
    rows = {r["key"]: r for r in summary["rows"]}
    control = [json.loads(line) for line in open(out / "dense_continued" / "seed0" / "metrics.jsonl")]
    for key in ("wikitext_ppl", "val_loss"):
        refs = {r["label"]: r["value"] for r in panels[key]["references"]}
        assert refs == {rows[k]["method"]: json.load(open(out / "curve_refs" / f"{k}.json"))[key]
                        for k in ("teacher", *ONESHOT)}
        # the dense control at step 0 is the teacher, evaluated by main.py on the curves' windows: the same value
        assert refs[rows["teacher"]["method"]] == next(r[key] for r in control if r["iter"] == 0 and key in r)
        for s in panels[key]["series"]:
            assert s["runs"] == 2 and len(s["iters"]) >= 3  # curves, not two points
    assert {s["label"] for s in panels["pruned_fraction"]["series"]} == {rows["gmp"]["method"],
                                                                         rows["imp"]["method"]}
    flips = {s["label"] for s in panels["flip_ratio"]["series"]}
    assert flips == {rows[k]["method"] for k in ("naive_retrain", "ast_naive", "ast_boosted")}  # no dense, no GMP
    assert "train CE" in panels["ce"]["title"] and "kl" in panels


def test_demo_prints_samples_from_the_teacher_the_one_shot_model_and_ast_boosted(demo_run):
    out, proc = demo_run
    summary = json.load(open(out / "results.json"))
    assert [s["model"] for s in summary["samples"]] == ["Dense teacher", "One-shot magnitude", "AST-Boosted"]
    for s in summary["samples"]:
        assert len(s["samples"]) == 2 and all(text for text in s["samples"])
        assert all(" ".join(text.split()) in proc.stdout for text in s["samples"])  # printed with the table


def test_demo_without_data_names_the_download_command(tmp_path):
    proc = run_demo(tmp_path / "out", "--data_root", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--download" in proc.stderr


def test_demo_gap_only_reuses_the_stages_and_reports_the_table_gap(demo_run, data_root):
    out, _ = demo_run
    summary = json.load(open(out / "results.json"))
    proc = run_demo(out, "--data_root", data_root, "--gap_only")
    assert proc.returncode == 0, proc.stderr
    assert "$ " not in proc.stdout  # teacher and one-shot pruning were reused, nothing else ran
    assert f"gap {100 * summary['oneshot_magnitude_gap']:.1f} %" in proc.stdout


@pytest.mark.parametrize("bad", ["n_layers=4", "n_layer", "teacher_lr=fast"])
def test_demo_set_rejects_unknown_keys_and_bad_values(tmp_path, data_root, bad):
    proc = run_demo(tmp_path / "out", "--data_root", data_root, "--set", bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--set" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_demo_set_overrides_the_preset(tmp_path, data_root):
    proc = run_demo(tmp_path / "out", "--data_root", data_root, "--set", "n_layer=2", "--set", "n_embd=16",
                    "--set", "teacher_ranks=2", "--gap_only")
    assert proc.returncode == 0, proc.stderr
    cfg = json.load(open(tmp_path / "out" / "teacher_hf" / "config.json"))
    assert (cfg["n_layer"], cfg["n_embd"]) == (2, 16)
    log = (tmp_path / "out" / "logs" / "teacher.log").read_text()  # the teacher trained as two DDP ranks
    assert "torch.distributed.run --standalone --nproc_per_node 2" in log and "2 rank(s) on cpu" in log
    assert "n_layer=2" in proc.stdout and not (tmp_path / "out" / "ast_naive").exists()
