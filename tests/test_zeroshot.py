"""zeroshot.py: the harness's accuracy on our model equals an independent scorer written here (transformers
log-likelihoods of each choice after the prompt, summed over the choice's tokens, argmax); a sparse checkpoint
and its export score the same, SLoRB included; main.py --zeroshot_tasks; results.py's second table; errors."""
import json
import math
import os
import shutil
import socket
import tempfile

import lm_eval
import lm_eval.tasks
import pytest
import torch

import cli
import export
import main as main_mod
import results
import zeroshot
from checkpoint import build_model, load_checkpoint, load_model, model_state, save_checkpoint
from conftest import save_tiny_family
from model import GPT
from sparsity import sparse_layers, sparsify

LIMIT = 5
NORM_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa")  # the tasks whose YAML lists acc_norm


# ---------------------------------------------------------------------------------------------- the reference
def rows(data_root, task, limit=LIMIT):
    """The first rows of a task's split, straight from the shared files (what --limit takes)."""
    import gzip

    rel = {"boolq": "boolq/validation.jsonl", "rte": "rte/glue_validation.jsonl",
           "hellaswag": "hellaswag/approx/validation.approx.jsonl.gz", "winogrande": "winogrande/validation.jsonl",
           "arc_easy": "arc_easy/test.jsonl", "arc_challenge": "arc_challenge/test.jsonl",
           "openbookqa": "openbookqa/test.jsonl"}[task]
    path = os.path.join(data_root, "zeroshot", rel)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return [json.loads(next(f)) for _ in range(limit)]


def prompts(task, row):
    """([(context, continuation) per choice], gold, choice texts for acc_norm) by the task's definition as
    written in the shared data's README (lm-eval 0.4.13's YAMLs): " " + choice after the context."""
    if task == "boolq":
        ctx, choices, gold = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], row["label"]
    elif task == "rte":
        ctx = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
        choices, gold = ["True", "False"], row["label"]
    elif task == "hellaswag":  # the approximate fallback rows are already preprocessed
        ctx, choices, gold = row["query"], row["choices"], row["gold"]
    elif task == "winogrande":  # partial scoring: the two options make two contexts, the rest is the answer
        i = row["sentence"].index("_")
        rest = " " + row["sentence"][i + 1:].strip()
        options = [row["sentence"][:i] + row["option1"], row["sentence"][:i] + row["option2"]]
        return [(o, rest) for o in options], int(row["answer"]) - 1, None
    elif task in ("arc_easy", "arc_challenge"):
        ctx, choices = f"Question: {row['question']}\nAnswer:", row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
    else:  # openbookqa
        ctx, choices = row["question_stem"], row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"].lstrip())
    return [(ctx, " " + c) for c in choices], gold, choices


@torch.no_grad()
def reference(hf, tok, data_root, tasks, limit=LIMIT):
    """Per task: {acc, acc_norm, lls per doc}, one example at a time with a transformers model, the prompt cut
    from the left to the model's context as the harness cuts it."""
    window = hf.config.max_position_embeddings if hasattr(hf.config, "max_position_embeddings") else \
        hf.config.n_positions
    out = {}
    for task in tasks:
        accs, norms, lls = [], [], []
        for row in rows(data_root, task, limit):
            pairs, gold, choices = prompts(task, row)
            scores = []
            for ctx, cont in pairs:
                ctx_ids = tok(ctx)["input_ids"]
                cont_ids = tok(ctx + cont)["input_ids"][len(ctx_ids):]
                ids = (ctx_ids + cont_ids)[-(window + 1):]
                logp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0].float(), -1)
                scores.append(sum(logp[len(ids) - 1 - len(cont_ids) + j, t].item() for j, t in enumerate(cont_ids)))
            lls.append(scores)
            accs.append(float(max(range(len(scores)), key=lambda k: (scores[k], -k)) == gold))
            if task in NORM_TASKS:
                normed = [s / len(c) for s, c in zip(scores, choices)]
                norms.append(float(max(range(len(normed)), key=lambda k: (normed[k], -k)) == gold))
        out[task] = {"acc": accs, "acc_norm": norms or None, "lls": lls}
    return out


def stderr(xs):
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def assert_matches(z, ref, tasks):
    for task in tasks:
        got, want = z["tasks"][task], ref[task]
        assert got["n"] == len(want["acc"]) and got["n_split"] > got["n"]
        assert got["acc"] == pytest.approx(sum(want["acc"]) / len(want["acc"]), abs=1e-12), task
        assert got["acc_stderr"] == pytest.approx(stderr(want["acc"]), abs=1e-9), task
        if want["acc_norm"] is not None:
            assert got["acc_norm"] == pytest.approx(sum(want["acc_norm"]) / len(want["acc_norm"]), abs=1e-12)
        else:
            assert "acc_norm" not in got
        for doc, lls in zip(z["per_doc"][task], want["lls"]):
            assert doc["lls"] == pytest.approx(lls, rel=1e-4, abs=1e-4), task


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def llama_dir(data_root, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("zs_llama"))
    save_tiny_family(path, "llama", data_root, seed=3)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_accuracy_equals_an_independent_transformers_scorer_offline(family, tiny_models, llama_dir, data_root,
                                                                   monkeypatch):
    import transformers

    from conftest import gpt2_tokenizer

    folder = tiny_models["student"] if family == "gpt2" else llama_dir
    attempts = []

    def no_network(sock, address):
        attempts.append(address)
        raise OSError("zero-shot evaluation must stay offline")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tasks = list(zeroshot.DEFAULT_TASKS)
    # batch 3: batches mix prompts of several lengths and tasks; boolq's passages exceed the context of 64
    z = zeroshot.evaluate_model(load_model(folder), tasks, limit=LIMIT, batch_size=3, per_doc=True)
    assert attempts == []
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = reference(hf, gpt2_tokenizer(data_root), data_root, tasks)
    assert_matches(z, ref, tasks)
    assert z["tasks"]["boolq"]["truncated_requests"] > 0  # the left cut was exercised
    accs = [z["tasks"][t]["acc"] for t in tasks]
    assert z["mean_acc"] == pytest.approx(sum(accs) / 7)
    assert z["mean_acc_without_hellaswag"] == pytest.approx((sum(accs) - z["tasks"]["hellaswag"]["acc"]) / 6)
    assert z["tasks"]["hellaswag"]["approximate"] and z["mean_includes_approximate"]
    assert not any(z["tasks"][t]["approximate"] for t in tasks if t != "hellaswag")
    assert z["tasks"]["arc_easy"]["chance"] == pytest.approx(sum(1 / len(r["choices"]["text"])
                                                                 for r in rows(data_root, "arc_easy")) / LIMIT)
    assert z["limit"] == LIMIT and z["harness"].startswith("lm_eval 0.4.")


def test_numbers_equal_the_harness_own_hf_model_on_the_same_folder(llama_dir):
    """lm_eval's HFLM on the transformers model gives the same log-likelihoods (so `lm_eval --model hf` on an
    export of a dense model agrees with zeroshot.py); a reference, not the independent scorer above."""
    from lm_eval.models.huggingface import HFLM

    tasks = ["boolq", "hellaswag", "winogrande", "openbookqa"]
    ours = zeroshot.evaluate_model(load_model(llama_dir), tasks, limit=4, batch_size=3, per_doc=True)
    with tempfile.TemporaryDirectory() as tmp:
        names = zeroshot.write_task_yamls(zeroshot.task_files(tasks), tmp)
        theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=llama_dir, batch_size=2, device="cpu"),
                                         tasks=list(names.values()), num_fewshot=0, limit=4,
                                         task_manager=lm_eval.tasks.TaskManager(include_path=tmp,
                                                                                include_defaults=False))
    for task, name in names.items():
        assert ours["tasks"][task]["acc"] == theirs["results"][name]["acc,none"]
        docs = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        for a, b in zip(ours["per_doc"][task], docs, strict=True):
            assert a["lls"] == pytest.approx([r[0] for r in b["filtered_resps"]], rel=1e-5, abs=1e-5)


def test_length_batches_keep_the_order_the_size_and_at_most_double_padding():
    inputs = [tuple(range(n)) for n in (40, 39, 30, 21, 20, 19, 18, 9, 3, 2, 1)]
    batches = list(zeroshot.length_batches(inputs, 4))
    assert [len(inp) for b in batches for inp in b] == [len(inp) for inp in inputs]
    assert [[len(inp) for inp in b] for b in batches] == [[40, 39, 30, 21], [20, 19, 18], [9], [3, 2], [1]]


def slorb_checkpoint(path, student_dir):
    """A 2:4 GPT-2 checkpoint with a non-trivial SLoRB branch (S random), as main.py writes one."""
    model = GPT.from_pretrained(student_dir)
    sparsify(model, slorb_k=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.slorb_S.add_(0.2 * torch.randn(layer.slorb_S.shape, generator=gen))
    save_checkpoint({**model_state(model), "config": {"student_model": student_dir, "init_from": ""}}, path)
    return build_model(load_checkpoint(path)).eval()


def test_sparse_checkpoint_and_its_export_give_the_same_numbers_slorb_included(tiny_models, data_root, tmp_path):
    import transformers

    from conftest import gpt2_tokenizer

    tasks = ["arc_easy", "winogrande", "openbookqa"]
    ckpt, exported, merged = str(tmp_path / "ckpt.pt"), str(tmp_path / "export"), str(tmp_path / "merged")
    slorb_checkpoint(ckpt, tiny_models["student"])
    export.main(["--checkpoint", ckpt, "--out", exported])  # SLoRB kept as a separate branch
    export.main(["--checkpoint", ckpt, "--out", merged, "--merge_slorb", "True"])  # W ⊙ M + S X, plain weights
    argv = ["--tasks", ",".join(tasks), "--limit", str(LIMIT), "--batch_size", "4"]
    a = zeroshot.main(["--model", ckpt, *argv, "--out", str(tmp_path / "a.json")])
    b = zeroshot.main(["--model", exported, *argv, "--out", str(tmp_path / "b.json")])
    assert json.load(open(tmp_path / "a.json"))["zeroshot"]["tasks"] == a["zeroshot"]["tasks"]
    for key in ("pattern", "slorb_k", "params_nonzero", "nm_ok"):
        assert a[key] == b[key]
    assert a["pattern"] == "2:4" and a["slorb_k"] == 16 and a["params_nonzero"] < a["params"]
    for task in tasks:
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"):
            if key in a["zeroshot"]["tasks"][task]:
                assert a["zeroshot"]["tasks"][task][key] == b["zeroshot"]["tasks"][task][key], (task, key)
    # the model as trained, SLoRB included: transformers on the merged weights is the independent reference,
    # and transformers on the 2:4 part alone (SLoRB dropped) is not the model
    z = zeroshot.evaluate_model(load_model(exported), tasks, limit=LIMIT, per_doc=True)
    tok = gpt2_tokenizer(data_root)
    assert_matches(z, reference(transformers.AutoModelForCausalLM.from_pretrained(merged).eval(), tok, data_root,
                                tasks), tasks)
    without = reference(transformers.AutoModelForCausalLM.from_pretrained(exported).eval(), tok, data_root, tasks)
    assert any(abs(x - y) > 1e-2 for t in tasks for d, w in zip(z["per_doc"][t], without[t]["lls"])
               for x, y in zip(d["lls"], w))


def test_main_zeroshot_tasks_scores_the_final_model_into_results_json(tiny_data, tiny_models, tmp_path):
    from test_main import shrink

    out = tmp_path / "run"
    res = main_mod.main(shrink(tiny_data, tiny_models, out, "--max_iters", "2", "--SLoRB", "True",
                               "--zeroshot_tasks", "arc_easy,rte", "--zeroshot_limit", "4"))
    saved = json.load(open(out / "results.json"))["zeroshot"]
    assert saved["tasks"] == res["zeroshot"]["tasks"] and list(saved["tasks"]) == ["arc_easy", "rte"]
    again = zeroshot.main(["--model", str(out / "ckpt.pt"), "--tasks", "arc_easy,rte", "--limit", "4"])["zeroshot"]
    for task in ("arc_easy", "rte"):
        assert again["tasks"][task]["acc"] == saved["tasks"][task]["acc"]
        assert again["tasks"][task]["n"] == 4


def test_results_renders_the_papers_second_table(tmp_path):
    def run(accs, nonzero, limit=None, **extra):
        tasks = {t: {"acc": a, "approximate": t == "hellaswag", "n": 10} for t, a in accs.items()}
        z = {"tasks": tasks, "limit": limit, "harness": "lm_eval 0.4.13", **zeroshot.means(tasks)}
        return {"params_nonzero": nonzero, "zeroshot": z, **extra}

    seven = dict(zip(zeroshot.DEFAULT_TASKS, (0.7, 0.6, 0.5, 0.65, 0.55, 0.3, 0.25)))
    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps(run(seven, 6_738_415_616)))
    sparse = tmp_path / "ast" / "results.json"
    sparse.parent.mkdir()
    sparse.write_text(json.dumps(run({"boolq": 0.6, "arc_easy": 0.5}, 3_400_000_000, limit=20, wikitext_ppl=30.0)))
    text, rows = results.main(["--label", f"LLaMA2-7B={dense}", str(sparse.parent)])
    first, second = text.split("\n\n")[:2]
    assert "| ast |" in first and "LLaMA2-7B" not in first  # the zero-shot-only file has no perplexity row
    lines = second.splitlines()
    assert lines[0] == ("| Models | Parameters | BoolQ | RTE | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Mean "
                        "| Mean w/o HellaSwag |")
    assert lines[2] == "| LLaMA2-7B | 6.74B | 70.00 | 60.00 | 50.00* | 65.00 | 55.00 | 30.00 | 25.00 | 50.71* | 50.83 |"
    assert lines[3] == ("| ast (first 20 per task) | 3.4B | 60.00 | – | – | – | 50.00 | – | – | 55.00 (2 of 7) "
                        "| 55.00 (2 of 6) |")
    assert "approximate" in text and "acc" in text
    assert rows[1]["zeroshot_mean"] == pytest.approx(0.55)


@pytest.mark.parametrize("argv,env,message", [
    (["--tasks", "boolq,nope"], None, "unknown zero-shot task 'nope': choose from boolq, rte"),
    ([], "empty", "zero-shot data folder"),
    (["--tasks", "rte"], "no_rte", "rte/glue_validation.jsonl not found"),
])
def test_unknown_task_and_missing_data_are_one_line_and_exit_2(argv, env, message, tiny_models, data_root, tmp_path,
                                                               monkeypatch, capsys):
    if env:
        root = tmp_path / "data"
        if env == "no_rte":
            shutil.copytree(os.path.join(data_root, "zeroshot", "boolq"), root / "zeroshot" / "boolq")
        root.mkdir(exist_ok=True)
        monkeypatch.setenv(cli.DATA_ENV, str(root))
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as e:
        cli.run(zeroshot.main, ["--model", tiny_models["student"], *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()
