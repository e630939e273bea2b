"""plot.py: the curves drawn are the runs' metrics (seed groups as mean and min-max band), with reference lines."""
import json

import numpy as np
import pytest

import plot
from cli import UserError


def write_run(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    """Two seeds of a distilled AST run, one plain run (no KL: its loss is its CE) and one GMP run."""
    ast = [write_run(tmp_path / "ast" / f"seed{s}", [
        {"iter": 0, "val_loss": 7.0 + s, "wikitext_ppl": 4000.0 + 100 * s},
        *({"iter": i, "loss": 9.0, "ce": 6.0 - i / 10 + s, "kl": 0.5 + s, "flip_ratio": 0.01 * s} for i in (5, 10)),
        {"iter": 10, "val_loss": 6.5 + s, "wikitext_ppl": 3000.0 + 100 * s}]) for s in (0, 1)]
    plain = write_run(tmp_path / "plain", [{"iter": 5, "loss": 6.2}, {"iter": 10, "loss": 6.1},
                                           {"iter": 10, "val_loss": 6.4, "wikitext_ppl": 2900.0}])
    gmp = write_run(tmp_path / "gmp", [{"iter": 5, "loss": 8.0, "ce": 6.3, "kl": 0.4, "flip_ratio": 0.0,
                                        "pruned_fraction": 0.5},
                                       {"iter": 10, "loss": 7.0, "ce": 6.2, "kl": 0.3, "flip_ratio": 0.0,
                                        "pruned_fraction": 1.0}])
    return {"AST": ast, "plain": [plain], "GMP": [gmp]}


def test_curves_are_the_seed_mean_with_a_min_max_band_and_the_reference_lines(runs, tmp_path):
    refs = {"wikitext_ppl": [("teacher", 2950.0), ("one-shot", 4600.0)], "val_loss": [("teacher", 6.3)]}
    fig, data = plot.figure(list(runs.items()), references=refs)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    ppl = axes["WikiText-2 perplexity"]
    lines = {line.get_label(): line for line in ppl.get_lines()}
    assert list(lines["AST"].get_ydata()) == [4050.0, 3050.0] and list(lines["AST"].get_xdata()) == [0, 10]
    for label, value in refs["wikitext_ppl"]:  # horizontal: the same y at both ends of the axis
        assert list(lines[label].get_ydata()) == [value, value]
    assert [c.get_label() for c in ppl.collections] and len(ppl.collections) == 1  # only AST has seeds: a band
    band = ppl.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 3000.0 and band.max() == 4100.0
    assert ppl.get_yscale() == "log" and sum(bool(t.get_text()) for t in ppl.get_yticklabels()) >= 2
    ce = {line.get_label(): line for line in axes["train CE (student)"].get_lines()}
    assert list(ce["plain"].get_ydata()) == [6.2, 6.1]  # no distillation: its loss is its CE
    assert list(ce["AST"].get_ydata()) == pytest.approx([6.0, 5.5])  # CE, never the weighted total "loss"
    assert "plain" not in {line.get_label() for line in axes["train KL to the teacher (distilled runs)"].get_lines()}
    flips = {line.get_label() for line in axes["mask flip ratio (re-selected masks)"].get_lines()}
    assert flips == {"AST"}  # GMP's masks change by pruning: its panel is the pruned fraction
    pruned = {line.get_label(): line for line in axes["pruned fraction (GMP, IMP)"].get_lines()}
    assert list(pruned) == ["GMP"] and list(pruned["GMP"].get_ydata()) == [0.5, 1.0]
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_labels == ["AST", "plain", "GMP", "teacher", "one-shot"]  # one shared legend
    assert all(ax.get_legend() is None for ax in fig.axes)
    w, h = fig.get_size_inches()
    assert len({round(ax.get_position().y0, 3) for ax in axes.values()}) >= 2 and w <= 16  # a grid, not a strip
    panel = next(p for p in data["panels"] if p["key"] == "val_loss")
    assert panel["references"] == [{"label": "teacher", "value": 6.3}]
    assert next(s for s in panel["series"] if s["label"] == "AST")["hi"] == [8.0, 7.5]


def test_plot_runs_writes_the_png_and_the_data_beside_it(runs, tmp_path):
    out = str(tmp_path / "curves.png")
    assert plot.plot_runs(list(runs.items()), out, references={"wikitext_ppl": [("teacher", 2950.0)]}) == out
    assert open(out, "rb").read(4) == b"\x89PNG"
    data = json.load(open(tmp_path / "curves.json"))
    ppl = next(p for p in data["panels"] if p["key"] == "wikitext_ppl")
    assert ppl["references"] == [{"label": "teacher", "value": 2950.0}]
    assert np.allclose(next(s for s in ppl["series"] if s["label"] == "AST")["mean"], [4050.0, 3050.0])


def test_cli_groups_a_folder_of_seed_runs(runs, tmp_path):
    ast_folder = str(tmp_path / "ast")
    assert plot.run_dirs_of(ast_folder) == runs["AST"]
    out = str(tmp_path / "cli.png")
    plot.main([ast_folder, runs["plain"][0], "--out", out])
    labels = {s["label"]: s["runs"] for p in json.load(open(tmp_path / "cli.json"))["panels"] for s in p["series"]}
    assert labels == {"ast": 2, "plain": 1}
    with pytest.raises(UserError):
        plot.run_dirs_of(str(tmp_path / "nothing"))
