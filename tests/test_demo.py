"""demo.py end to end in its tiny preset: every stage through the public commands, the table, resume."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_demo(out_dir, *extra):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "demo.py"), "--preset", "tiny", "--quiet",
                           "--out_dir", str(out_dir), *extra], capture_output=True, text=True, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def demo_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_demo(out, "--data_root", data_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_table_has_every_method_and_every_sparse_result_is_2_4(demo_run):
    out, proc = demo_run
    summary = json.load(open(out / "results.json"))
    keys = [r["key"] for r in summary["rows"]]
    assert keys == ["teacher", "dense_continued", "oneshot_magnitude", "oneshot_wanda", "oneshot_wanda_recon",
                    "oneshot_sparsegpt",
                    "naive_retrain", "gmp", "imp", "ast_naive", "ast_boosted"]
    for row in summary["rows"]:
        assert row["wikitext_ppl"] > 1 and row["val_loss"] > 0
        if row["key"] in ("teacher", "dense_continued"):
            assert row["nm_ok"] is None and row["mean_sparsity"] == 0
        else:
            assert row["nm_ok"] is True and row["mean_sparsity"] == pytest.approx(0.5)
    trained = [r for r in summary["rows"] if r["training"].startswith("yes")]
    assert len({r["tokens"] for r in trained}) == 1 and trained[0]["tokens"] > 0  # equal token budgets
    control = next(r for r in summary["rows"] if r["key"] == "dense_continued")
    assert control["ppl_vs_control"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 12 and "AST-Boosted" in md and "2:4 ✓" in md
    assert open(out / "curves.png", "rb").read(4) == b"\x89PNG"
    assert "main.py" in proc.stdout and "prune.py" in proc.stdout  # the public commands are printed


def test_demo_rerun_skips_finished_stages_and_gives_the_same_table(demo_run, data_root):
    out, _ = demo_run
    before = json.load(open(out / "results.json"))
    proc = run_demo(out, "--data_root", data_root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped") == 16 and "$ " not in proc.stdout
    after = json.load(open(out / "results.json"))
    assert after["rows"] == before["rows"]


def test_demo_without_data_names_the_download_command(tmp_path):
    proc = run_demo(tmp_path / "out", "--data_root", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--download" in proc.stderr


def test_demo_is_deterministic_for_a_seed(demo_run, data_root, tmp_path):
    out, _ = demo_run
    proc = run_demo(tmp_path / "again", "--data_root", data_root)
    assert proc.returncode == 0, proc.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]  # noqa: E731
    first = json.load(open(out / "results.json"))["rows"]
    second = json.load(open(tmp_path / "again" / "results.json"))["rows"]
    assert strip(first) == strip(second)


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
                    "--gap_only")
    assert proc.returncode == 0, proc.stderr
    cfg = json.load(open(tmp_path / "out" / "teacher_hf" / "config.json"))
    assert (cfg["n_layer"], cfg["n_embd"]) == (2, 16)
    assert "n_layer=2" in proc.stdout and not (tmp_path / "out" / "ast_naive").exists()
