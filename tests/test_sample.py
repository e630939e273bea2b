"""sample.py: seeded text from any model source, and the distribution it draws from is the model's softmax."""
import json

import pytest
import torch

import cli
import families
import sample
from checkpoint import load_model, model_state, save_checkpoint
from conftest import save_tiny_family
from model import GPT, GPTConfig
from sparsity import sparse_layers, sparsify


def run(model, *extra, start="The city council said"):
    return sample.main(["--model", model, "--start", start, "--num_samples", "2", "--max_new_tokens", "8",
                        "--device", "cpu", *extra])


def test_same_seed_gives_the_same_text_and_another_seed_other_text(tiny_gpt2_dir, data_root):
    first, again = run(tiny_gpt2_dir, "--seed", "7"), run(tiny_gpt2_dir, "--seed", "7")
    assert first == again and len(first) == 2 and all(first)
    assert run(tiny_gpt2_dir, "--seed", "8") != first


def test_first_token_distribution_is_the_models_softmax(tiny_gpt2_dir, data_root):
    """Against transformers' own GPT2LMHeadModel on the same folder: temperature 1 is its softmax; temperature
    and top-k reshape it as documented."""
    from transformers import GPT2LMHeadModel

    ours = load_model(tiny_gpt2_dir).eval()
    ref = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    idx = torch.tensor([[464, 1748, 6820, 531]])  # "The city council said"
    with torch.no_grad():
        logits = ref(idx).logits[0, -1].double()
        got = sample.next_token_probs(ours, idx, temperature=1.0)[0].double()
        torch.testing.assert_close(got, torch.softmax(logits, -1), atol=1e-6, rtol=1e-4)
        hot = sample.next_token_probs(ours, idx, temperature=0.5, top_k=10)[0].double()
    keep = torch.topk(logits, 10).indices
    want = torch.zeros_like(logits)
    want[keep] = torch.softmax(logits[keep] / 0.5, -1)
    torch.testing.assert_close(hot, want, atol=1e-6, rtol=1e-4)


def test_drawn_first_tokens_follow_the_distribution():
    """40,000 seeded draws of the first token from a 12-token model: frequencies within 4.5 standard errors."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a distribution far from uniform
        idx = torch.tensor([[3, 1, 4]])
        probs = torch.softmax(model(idx)[0][0, -1].double(), -1)
        n = 40_000
        out = sample.generate(model, idx.repeat(n, 1), 1, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, -1], minlength=12).double() / n
    assert probs.max() > 0.3 and probs.min() < 0.02
    assert ((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-12).all(), (freq, probs)


def test_samples_an_ast_boosted_checkpoint_with_its_slorb_branch(tiny_gpt2_dir, data_root, tmp_path):
    model = load_model(tiny_gpt2_dir)
    sparsify(model, n=2, m=4, slorb_k=16, slorb_init="mean", trainable_projection=True,
             filter_fn=families.sparse_filter(model))
    assert all(layer.slorb_S.abs().sum() > 0 for _, layer in sparse_layers(model))
    path = str(tmp_path / "boosted.pt")
    save_checkpoint(model_state(model), path)
    model.eval()
    idx = torch.tensor([[464, 1748, 6820, 531]])
    with torch.no_grad():
        want = sample.next_token_probs(model, idx)[0]
        for _, layer in sparse_layers(model):  # the same model without SLoRB draws from another distribution
            layer.slorb_S.zero_()
        without = sample.next_token_probs(model, idx)[0]
        got = sample.next_token_probs(load_model(path).eval(), idx)[0]
    torch.testing.assert_close(got, want)
    assert (without / want - 1).abs().max() > 1e-2  # a random tiny model's distribution is near uniform
    assert run(path, "--seed", "3") == run(path, "--seed", "3")


def test_samples_a_llama_folder_with_its_own_tokenizer(data_root, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(tmp_path / "llama")
    save_tiny_family(folder, "llama", data_root)
    texts = run(folder, "--seed", "1", "--temperature", "1.0", "--top_k", "0")
    assert texts == run(folder, "--seed", "1", "--temperature", "1.0", "--top_k", "0") and all(texts)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok("The city council said")["input_ids"]])
    with torch.no_grad():
        want = torch.softmax(AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits[0, -1].double(), -1)
        got = sample.next_token_probs(load_model(folder).eval(), ids)[0].double()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_bad_settings_and_unreadable_prompt_files_are_one_line_errors(tiny_gpt2_dir, tmp_path, capsys):
    for extra in (["--temperature", "-1"], ["--start", f"FILE:{tmp_path / 'missing.txt'}"]):
        with pytest.raises(SystemExit) as e:
            cli.run(sample.main, ["--model", tiny_gpt2_dir, *extra])
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time")
    assert run(tiny_gpt2_dir, "--seed", "1", start=f"FILE:{prompt}")[0] == \
        sample.main(["--model", tiny_gpt2_dir, "--start", "Once upon a time", "--num_samples", "2",
                     "--max_new_tokens", "8", "--device", "cpu", "--seed", "1"])[0]


def test_several_prompts_each_give_what_they_give_alone_and_all_are_written(tiny_gpt2_dir, tmp_path):
    """--start twice: each prompt sampled with the same seed as a run of its own; the JSON holds both."""
    out = tmp_path / "two.json"
    both = run(tiny_gpt2_dir, "--seed", "3", "--start", "Once upon a time", "--out", str(out))
    alone = [run(tiny_gpt2_dir, "--seed", "3"), run(tiny_gpt2_dir, "--seed", "3", start="Once upon a time")]
    assert both == alone and alone[0] != alone[1]
    saved = json.load(open(out))
    assert [p["prompt"] for p in saved["prompts"]] == ["The city council said", "Once upon a time"]
    assert [p["samples"] for p in saved["prompts"]] == alone and saved["samples"] == alone[0]
