"""results.py: the evaluation JSON of main.py, prune.py and evaluate.py runs as the paper's table."""
import json

import pytest

import results
from cli import UserError

MAIN = {"iter": 40000, "tokens": 5_242_880_000, "val_loss": 3.2101, "wikitext_ppl": 33.48, "ppl_windows": 0,
        "nm_ok": True, "sparse_layers": 48, "mean_sparsity": 0.5,
        "config": {"mode": "sparse_forward", "prune_schedule": "gradual", "distill_model": True, "SLoRB": False,
                   "srste_decay": 0.0, "N": 2, "M": 4}}
PRUNE = {"method": "sparsegpt", "training": False, "tokens": 0, "pattern": "2:4", "nm_ok": True,
         "sparse_layers": 48, "mean_sparsity": 0.5, "wikitext_ppl": 50.0913, "ppl_windows": 8}
EVAL = {"model": "gpt2", "nm_ok": None, "sparse_layers": 0, "mean_sparsity": 0.0, "wikitext_ppl": 29.95,
        "ppl_windows": 0, "val_loss": 3.1}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def test_table_rows_from_the_three_kinds_of_results(tmp_path):
    dense = write(tmp_path / "dense.json", EVAL)
    sgpt = write(tmp_path / "sgpt.json", PRUNE)
    gmp_dir = tmp_path / "gmp"
    write(gmp_dir / "results.json", MAIN)
    out = tmp_path / "table.json"
    table, rows = results.main(["--label", f"Dense={dense}", "--label", f"SparseGPT={sgpt}", str(gmp_dir),
                                "--json", str(out)])
    lines = table.splitlines()
    assert lines[0] == "| method | training | WikiText-2 ppl | C4 val loss | tokens | sparsity / N:M | parameters |"
    assert lines[2] == "| Dense | – | 29.95 | 3.1000 | – | dense | – |"
    assert lines[3] == "| SparseGPT | no (sparsegpt) | 50.09 (8 windows) | – | 0 | 2:4 ✓ (50.0 %) | – |"
    assert lines[4] == "| gmp | yes (GMP + distill) | 33.48 | 3.2101 | 5.24B | 2:4 ✓ (50.0 %) | – |"
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["Dense", "SparseGPT", "gmp"] and saved[2]["tokens_raw"] == 5_242_880_000


def test_the_model_not_the_flags_describes_a_row(tmp_path):
    # flags said 2:4 without SLoRB; the evaluated model (main.py kept a sparse starting point) is 4:8 with SLoRB
    run = dict(MAIN, pattern="4:8", slorb_k=16, params_nonzero=74_000_000, dense_param_share=0.45,
               config=dict(MAIN["config"], prune_schedule="none", SLoRB=False))
    _, rows = results.main([write(tmp_path / "kept" / "results.json", run)])
    assert rows[0]["sparsity / N:M"] == "4:8 ✓ (50.0 %) + SLoRB k=16"
    assert rows[0]["training"] == "yes (AST + distill + SLoRB)"
    assert rows[0]["parameters"] == "74.00M (45.0 % dense)"


def test_broken_nm_and_ast_runs_are_labelled(tmp_path):
    run = dict(MAIN, nm_ok=False, config=dict(MAIN["config"], prune_schedule="none", SLoRB=True, srste_decay=1e-4))
    _, rows = results.main([write(tmp_path / "ast_boosted" / "results.json", run)])
    assert rows[0]["method"] == "ast_boosted"
    assert rows[0]["training"] == "yes (AST + distill + SLoRB + SR-STE)"
    assert "NOT N:M" in rows[0]["sparsity / N:M"]


@pytest.mark.parametrize("argv,match", [([], "no runs"), (["--label", "x"], "NAME=PATH"),
                                        (["nowhere.json"], "not found")])
def test_errors(argv, match, tmp_path):
    with pytest.raises(UserError, match=match):
        results.main(argv)


def test_paper_layout_has_methods_as_rows_and_models_as_columns(tmp_path):
    runs = {
        "Dense@OPT-125M": EVAL, "Dense@GPT2-124M": dict(EVAL, wikitext_ppl=29.95),
        "GMP@OPT-125M": dict(EVAL, wikitext_ppl=31.51, nm_ok=True, sparse_layers=72),  # evaluate.py of a ckpt
        "GMP@GPT2-124M": MAIN,
        "SparseGPT@OPT-125M": PRUNE, "SparseGPT@GPT2-124M": dict(PRUNE, wikitext_ppl=50.09, ppl_windows=0),
        "Wanda + recon@GPT2-124M": dict(PRUNE, method="wanda", reconstruct={"epochs": 10}, wikitext_ppl=40.0,
                                        ppl_windows=0, nm_ok=False),
    }
    labels = sum((["--label", f"{k}={write(tmp_path / f'{i}.json', v)}"] for i, (k, v) in enumerate(runs.items())),
                 [])
    table, rows = results.main(labels)
    assert table.splitlines() == [
        "| Method | Training | OPT-125M | GPT2-124M |",
        "|---|---|---|---|",
        "| Dense | – | 29.95 | 29.95 |",
        "| GMP | yes (GMP + distill) | 31.51 | 33.48 |",
        "| SparseGPT | no (sparsegpt) | 50.09 (8 windows) | 50.09 |",
        "| Wanda + recon | no (wanda + reconstruction) | – | 40.00 ✗ NOT N:M |",
    ]
    assert len(rows) == 7
