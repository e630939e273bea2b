"""The data pipeline: tokenizer resolution, C4 and WikiText preparation, calibration windows, batch loading."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cli import UserError
from data import loader, tokenizer
from data.c4_dataset import prepare as c4_prepare
from data.loader import BinDataset, GlobalBatchSampler, eval_batches, load_calibration, load_wikitext_tokens
from data.tokenizer import EOT, get_gpt2_encoding, tokenizer_source
from data.wikitext import prepare as wikitext_prepare
import prepare_calibration_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C4_TRAIN = "c4/en/c4-train.00000-of-01024.head1000.json.gz"
C4_VAL = "c4/en/c4-validation.00000-of-00008.head1000.json.gz"
HELLO = [15496, 995]


def c4_texts(path, limit=None):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for i, line in enumerate(f) if limit is None or i < limit]


@pytest.fixture
def reference_gpt2(data_root, monkeypatch):
    """tiktoken's own gpt2 encoding from the shared cache: an independent check on our tokenizer and counts."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(data_root, "gpt2_tokenizer", "tiktoken_cache"))
    return tiktoken.get_encoding("gpt2")


def run_main(module, *args):
    """Call a script's main() in-process (much faster than a subprocess), flags given as any values."""
    return module.main([str(a) for a in args])


def run_script(script, *args):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, stderr, *fragments):
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]


def snapshot(folder):
    """{name: (bytes, mtime)} of every file in folder: proof that nothing was touched."""
    return {n: (open(os.path.join(folder, n), "rb").read(), os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder))}


def write_jsonl(path, rows, gz=False):
    with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# ------------------------------------------------------------------ tokenizer

@pytest.mark.parametrize("subdir", ["gpt2_tokenizer", "gpt2_tokenizer/hf"], ids=["encoder.json+vocab.bpe",
                                                                               "hf_vocab.json+merges.txt"])
def test_tokenizer_loads_from_a_bpe_file_folder(data_root, reference_gpt2, subdir):
    enc = get_gpt2_encoding(os.path.join(data_root, subdir))
    assert enc.encode("Hello world") == HELLO
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    text = "Ünïcode, spaces   and\n\nnewlines <|endoftext|> 123"
    assert enc.encode_ordinary(text) == reference_gpt2.encode_ordinary(text)


def test_tokenizer_loads_from_tiktoken_cache_dir(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(data_root, "gpt2_tokenizer", "tiktoken_cache"))
    monkeypatch.setenv("SPARSE_GPT2_DATA", str(tmp_path))  # no shared-folder fallback to hide behind
    assert get_gpt2_encoding().encode("Hello world") == HELLO
    assert tokenizer_source().startswith("TIKTOKEN_CACHE_DIR=")


def test_tokenizer_falls_back_to_shared_data_folder(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    assert get_gpt2_encoding().encode("Hello world") == HELLO
    assert tokenizer_source() == os.path.join(data_root, "gpt2_tokenizer")


def test_tokenizer_nowhere_to_be_found_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(name):
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSE_GPT2_DATA", str(tmp_path))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", no_network)
    with pytest.raises(UserError) as e:
        get_gpt2_encoding()
    message = str(e.value)
    assert "\n" not in message and "encoder.json + vocab.bpe" in message and "--tokenizer_dir" in message
    with pytest.raises(UserError, match="neither encoder.json"):
        get_gpt2_encoding(str(tmp_path))


def test_tokenizer_rejects_bpe_files_of_another_tokenizer(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(UserError, match="not the GPT-2 BPE files"):
        get_gpt2_encoding(str(tmp_path))


# ------------------------------------------------------------------ C4

def test_c4_bins_match_an_independent_tiktoken_count(data_root, reference_gpt2, tmp_path):
    n = 300
    run_main(c4_prepare, "--input", os.path.join(data_root, C4_TRAIN), "--val_files",
             os.path.join(data_root, C4_VAL), "--out_dir", tmp_path, "--max_docs", n, "--num_proc", 1)
    meta = json.loads((tmp_path / "meta.json").read_text())
    for split, name in (("train", C4_TRAIN), ("val", C4_VAL)):
        texts = c4_texts(os.path.join(data_root, name), limit=n)
        tokens = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        assert len(tokens) == sum(len(reference_gpt2.encode_ordinary(t)) + 1 for t in texts)
        assert (tokens == EOT).sum() == n == meta["splits"][split]["documents"]
        assert meta["splits"][split]["tokens"] == len(tokens)
        first = tokens[:np.argmax(tokens == EOT)]
        assert reference_gpt2.decode(first.tolist()) == texts[0]
    assert meta["vocab_size"] == 50257
    assert len(meta["sources"]["train"][0]["sha256"]) == 64


def test_c4_output_does_not_depend_on_num_proc(data_root, tmp_path):
    for num_proc in (1, 2):
        run_main(c4_prepare, "--input", os.path.join(data_root, C4_TRAIN), "--val_fraction", 0.05, "--seed", 3,
                 "--max_docs", 700, "--out_dir", tmp_path / str(num_proc), "--num_proc", num_proc)
    for split in ("train", "val"):
        assert (tmp_path / "1" / f"{split}.bin").read_bytes() == (tmp_path / "2" / f"{split}.bin").read_bytes()
    meta = json.loads((tmp_path / "1" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 700
    assert 10 < meta["splits"]["val"]["documents"] < 70  # about 5 %


def test_c4_reads_jsonl_redpajama_rows_folders_and_globs(reference_gpt2, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    allenai = [{"text": f"Document {i}.\nSecond line.", "timestamp": "2019-04-25T12:57:54Z", "url": "u"}
               for i in range(5)]
    redpajama = [{"text": f"Red pajama {i} ü", "meta": {"timestamp": "t", "url": "u", "language": "en"}}
                 for i in range(4)]
    write_jsonl(src / "a.json.gz", allenai, gz=True)
    write_jsonl(src / "b.jsonl", redpajama[:2] + [""] + redpajama[2:])  # a blank line is not a document
    val = write_jsonl(tmp_path / "val.jsonl", allenai[:2])
    run_main(c4_prepare, "--input", src, "--val_files", str(tmp_path / "v*.jsonl"), "--out_dir", tmp_path / "out")
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    expected = [t for d in allenai + redpajama for t in reference_gpt2.encode_ordinary(d["text"]) + [EOT]]
    assert tokens.tolist() == expected
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["sources"]["val"][0]["file"] == val


def test_c4_max_tokens_keeps_whole_documents(data_root, tmp_path):
    run_main(c4_prepare, "--input", os.path.join(data_root, C4_TRAIN), "--val_files",
             os.path.join(data_root, C4_VAL), "--max_tokens", 5000, "--out_dir", tmp_path)
    for split in ("train", "val"):
        tokens = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16)
        ends = np.flatnonzero(tokens == EOT)
        assert ends[-1] == len(tokens) - 1 and len(tokens) >= 5000  # the last document is whole
        assert ends[-2] + 1 < 5000  # and it is the one that reached the limit


def write_bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine too"}, '{"text": "broken"'])
    return {"missing": ([tmp_path / "nope.json.gz"], ["nope.json.gz", "not found"]),
            "empty": ([empty], ["empty.jsonl", "no documents"]),
            "bad_json": ([bad], ["bad.jsonl:3:", "not valid JSON"])}


@pytest.mark.parametrize("case", ["missing", "empty", "bad_json"])
def test_c4_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    inputs, fragments = write_bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    rc, _, err = run_script("data/c4_dataset/prepare.py", "--input", *inputs, "--out_dir", out,
                            "--val_fraction", 0.5)
    assert_one_line_error(rc, err, *fragments)
    assert not out.exists() or os.listdir(out) == []  # no .bin, no leftover temp file


@pytest.mark.parametrize("case", ["missing", "empty", "bad_json"])
def test_wikitext_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    if case == "empty":
        (src / "test.jsonl").write_text("")
    elif case == "bad_json":
        write_jsonl(src / "test.jsonl", [{"text": ""}, '{"text": 1}'])
    rc, _, err = run_script("data/wikitext/prepare.py", "--input", src, "--out_dir", tmp_path / "out")
    fragment = {"missing": "no WikiText-2 test split", "empty": "no text",
                "bad_json": "test.jsonl:2: expected a JSON object with a string \"text\" field"}[case]
    assert_one_line_error(rc, err, fragment)
    assert not (tmp_path / "out").exists()


def test_calibration_missing_input_is_one_line_error(tmp_path):
    rc, _, err = run_script("prepare_calibration_data.py", "--input", tmp_path / "nope.json.gz",
                            "--out", tmp_path / "c.pt")
    assert_one_line_error(rc, err, "nope.json.gz: not found")
    assert os.listdir(tmp_path) == []


def test_c4_failed_forced_run_keeps_previous_outputs(data_root, tmp_path):
    run_main(c4_prepare, "--input", os.path.join(data_root, C4_TRAIN), "--val_fraction", 0.1, "--max_docs", 50,
             "--out_dir", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    bad = write_bad_inputs(tmp_path)["bad_json"][0][0]
    rc, _, err = run_script("data/c4_dataset/prepare.py", "--input", os.path.join(data_root, C4_TRAIN),
                            "--input", bad, "--out_dir", tmp_path / "out", "--force", "--num_proc", 2)
    assert_one_line_error(rc, err, "bad.jsonl:3:")
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("script", ["c4", "wikitext", "calibration"])
def test_existing_output_is_not_overwritten_without_force(data_root, tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    if script == "c4":
        (out / "train.bin").write_bytes(b"old!")
        cmd = ["data/c4_dataset/prepare.py", "--input", os.path.join(data_root, C4_TRAIN), "--out_dir", out]
        target = "train.bin"
    elif script == "wikitext":
        (out / "test.bin").write_bytes(b"old!")
        cmd = ["data/wikitext/prepare.py", "--input", os.path.join(data_root, "wikitext2"), "--out_dir", out]
        target = "test.bin"
    else:
        (out / "calib.pt").write_bytes(b"old!")
        cmd = ["prepare_calibration_data.py", "--input", os.path.join(data_root, C4_TRAIN),
               "--out", out / "calib.pt"]
        target = "calib.pt"
    before = snapshot(out)
    rc, _, err = run_script(*cmd)
    assert_one_line_error(rc, err, target, "--force")
    assert snapshot(out) == before


def test_bad_flag_is_one_line_error():
    rc, _, err = run_script("data/c4_dataset/prepare.py", "--input", "x", "--no_such_flag")
    assert_one_line_error(rc, err, "--no_such_flag")


# ------------------------------------------------------------------ WikiText-2

@pytest.mark.parametrize("form", ["raw", "jsonl"])
def test_wikitext_test_split_has_287644_tokens(data_root, tmp_path, form):
    names = {"raw": ["wiki.test.raw", "wiki.valid.raw"], "jsonl": ["test.jsonl", "validation.jsonl"]}[form]
    args = [a for n in names for a in ("--input", os.path.join(data_root, "wikitext2", n))]
    run_main(wikitext_prepare, *args + ["--out_dir", tmp_path])
    assert os.path.getsize(tmp_path / "test.bin") == 2 * 287_644
    assert os.path.getsize(tmp_path / "val.bin") == 2 * 251_048
    tokens = load_wikitext_tokens(str(tmp_path), "test")
    assert tokens.dtype == torch.long and tokens.shape == (287_644,)
    assert len(tokens) // 1024 == 280  # the paper's number of non-overlapping windows


def test_wikitext_tokens_missing_says_how_to_make_them(tmp_path):
    with pytest.raises(UserError, match="data/wikitext/prepare.py"):
        load_wikitext_tokens(str(tmp_path))


# ------------------------------------------------------------------ calibration

def test_calibration_is_reproducible_per_seed(data_root, tmp_path, reference_gpt2):
    def make(name, seed):
        prepare_calibration_data.main(["--input", os.path.join(data_root, C4_TRAIN), "--nsamples", "12",
                                       "--seqlen", "256", "--seed", str(seed), "--out", str(tmp_path / name)])
        return (tmp_path / name).read_bytes()

    a, b, c = make("a.pt", 0), make("other_name.pt", 0), make("c.pt", 1)
    assert a == b and a != c
    tokens, meta = load_calibration(str(tmp_path / "a.pt"))
    assert tokens.dtype == torch.long and tokens.shape == (12, 256)
    assert (meta["seed"], meta["seqlen"], meta["nsamples"]) == (0, 256, 12)
    assert meta["sources"][0]["file"] == os.path.basename(C4_TRAIN)
    # every window is a contiguous piece of a distinct document longer than seqlen
    texts = c4_texts(os.path.join(data_root, C4_TRAIN))
    docs = [np.array(reference_gpt2.encode_ordinary(t), dtype=np.int64) for t in texts]
    found = []
    for window in tokens.numpy():
        hits = [i for i, d in enumerate(docs) if len(d) > 256 and window.tobytes() in d.tobytes()]
        assert hits
        found.append(hits[0])
    assert len(set(found)) == 12


def test_calibration_with_too_few_long_documents_is_clear_error(data_root, tmp_path):
    with pytest.raises(UserError, match=r"only 106 of the 1,000 input documents have more than 1024 tokens"):
        prepare_calibration_data.main(["--input", os.path.join(data_root, C4_TRAIN), "--nsamples", "128",
                                       "--seqlen", "1024", "--out", str(tmp_path / "c.pt")])
    assert not (tmp_path / "c.pt").exists()


def test_load_calibration_rejects_other_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    torch.save({"tokens": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "y.pt")
    for name in ("x.pt", "y.pt", "missing.pt"):
        with pytest.raises(UserError, match="prepare_calibration_data.py"):
            load_calibration(str(tmp_path / name))


# ------------------------------------------------------------------ loader

@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    (np.arange(20_000) % 50_257).astype(np.uint16).tofile(path)
    return str(path)


def global_batch(dataset, sampler, step, world_size, micro_batch_size):
    """The step's batch as all ranks together see it, concatenated in rank order."""
    xs, ys = [], []
    for rank in range(world_size):
        for x, y in loader.micro_batches(dataset, sampler, step, rank, world_size, micro_batch_size):
            assert x.shape == (micro_batch_size, dataset.block_size)
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_global_batch_is_the_same_for_1x4_and_2x2_micro_batches(token_file):
    dataset = BinDataset(token_file, block_size=32)
    sampler = GlobalBatchSampler(len(dataset), 32, global_batch_size=8, seed=7)
    for step in (0, 1, 1234):
        x1, y1 = global_batch(dataset, sampler, step, world_size=1, micro_batch_size=2)
        x2, y2 = global_batch(dataset, sampler, step, world_size=2, micro_batch_size=2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@settings(max_examples=25, deadline=None)
@given(world_size=st.sampled_from([1, 2, 4]), micro=st.sampled_from([1, 2, 4]), step=st.integers(0, 10**6))
def test_global_batch_never_depends_on_the_split(tmp_path_factory, world_size, micro, step):
    path = tmp_path_factory.getbasetemp() / "hypothesis_train.bin"
    if not path.exists():
        (np.arange(5_000) % 50_257).astype(np.uint16).tofile(path)
    dataset = BinDataset(str(path), block_size=16)
    sampler = GlobalBatchSampler(len(dataset), 16, global_batch_size=16, seed=1)
    x, y = global_batch(dataset, sampler, step, world_size, micro)
    x1, y1 = dataset.get_batch(sampler.offsets(step))
    assert torch.equal(x, x1) and torch.equal(y, y1)


def test_y_is_x_shifted_by_one(token_file):
    dataset = BinDataset(token_file, block_size=64)
    offsets = GlobalBatchSampler(len(dataset), 64, 16, seed=0).offsets(5)
    x, y = dataset.get_batch(offsets)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    data = np.fromfile(token_file, dtype=np.uint16)
    assert y[:, -1].tolist() == [int(data[o + 64]) for o in offsets]
    assert offsets.min() >= 0 and offsets.max() + 64 + 1 <= len(data)


def test_offsets_are_a_function_of_seed_and_step(token_file):
    def offsets(seed, step):
        return GlobalBatchSampler(20_000, 32, 8, seed).offsets(step)  # a fresh sampler, as after a resume

    assert np.array_equal(offsets(0, 3), offsets(0, 3))
    assert not np.array_equal(offsets(0, 3), offsets(0, 4))
    assert not np.array_equal(offsets(0, 3), offsets(1, 3))


def test_eval_batches_are_the_same_at_every_evaluation(token_file):
    dataset = BinDataset(token_file, block_size=32)
    first = [x for x, _ in eval_batches(dataset, batch_size=4, eval_iters=3)]
    second = [x for x, _ in eval_batches(dataset, batch_size=4, eval_iters=3)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_batch_split_that_does_not_divide_is_an_error(token_file):
    dataset = BinDataset(token_file, block_size=32)
    sampler = GlobalBatchSampler(len(dataset), 32, global_batch_size=6, seed=0)
    with pytest.raises(UserError, match="not divisible by world size"):
        list(loader.micro_batches(dataset, sampler, 0, 0, 4, 1))
    with pytest.raises(UserError, match="not divisible by micro batch"):
        list(loader.micro_batches(dataset, sampler, 0, 0, 2, 2))


def test_missing_or_short_bin_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"not found: run `python data/c4_dataset/prepare.py --input"):
        BinDataset(str(tmp_path / "train.bin"), block_size=32)
    np.arange(32, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(UserError, match="fewer than block_size"):
        BinDataset(str(tmp_path / "short.bin"), block_size=32)
