"""scripts/tie_flips.py: the share of a run's mask changes in groups tied in the dense weights, counted by hand."""
import importlib.util
import os

import pytest
import torch

from checkpoint import pack_masks
from conftest import REPO_ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("tie_flips", os.path.join(REPO_ROOT, "scripts", "tie_flips.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tie_flips_counts_changed_groups_and_those_tied_in_the_dense_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    # one row of three 4-groups: group 0 tied at the 2:4 boundary (|w| 0.5, 0.5 are 2nd and 3rd), group 1 tied only
    # below it (0.1, 0.1 are 3rd and 4th), group 2 untied
    w = torch.tensor([[0.9, -0.5, 0.5, 0.1, 0.8, 0.7, 0.1, -0.1, 0.4, 0.3, 0.2, 0.1]])
    init = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0]], dtype=torch.bool)  # groups 0 and 2 changed
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(tmp_path / "dense.safetensors"))
    state = {"hf.model.layers.0.mlp.up_proj.mask": mask, "hf.model.layers.0.mlp.up_proj.init_mask": init}
    torch.save({"model": pack_masks(state)}, tmp_path / "ckpt.pt")
    load_script().main([str(tmp_path / "ckpt.pt"), str(tmp_path / "dense.safetensors")])
    out = capsys.readouterr().out
    # tied: 1 of 3 groups; changed: 2 of 3; of the changed, tied: 1 of 2
    assert "3 groups" in out and "dense weights 0.3333" in out and "step 0 0.6667" in out and "tied 0.5000" in out


def test_tie_flips_refuses_a_checkpoint_without_step0_masks(tmp_path):
    from safetensors.torch import save_file

    import cli

    save_file({"w.weight": torch.zeros(1, 4)}, str(tmp_path / "dense.safetensors"))
    torch.save({"model": {"w.weight": torch.zeros(1, 4)}}, tmp_path / "ckpt.pt")
    with pytest.raises(cli.UserError, match="init_mask"):
        load_script().main([str(tmp_path / "ckpt.pt"), str(tmp_path / "dense.safetensors")])
