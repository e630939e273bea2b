"""The inputs of scripts/gpu_check.sh's main.py runs, made here from nothing: a byte-level BPE tokenizer trained on
seeded synthetic text, a tiny random GPT-2 folder that carries it, and C4-style and WikiText-style token files made
by the project's own prepare scripts with that tokenizer. No shared data, no network, nothing to install beyond
requirements.txt (the tokenizer is trained with `tokenizers`, which transformers brings).

    python scripts/gpu_check_inputs.py OUT     # OUT/tiny_gpt2, OUT/c4, OUT/wikitext and OUT/run_flags

OUT/run_flags holds main.py's flags for these inputs, one per line, without --device (the check adds it).
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
WORDS = ("the council said on monday that a new plan for the city would bring more homes and jobs to people who "
         "live near river park school road market in spring summer autumn winter while others asked why it took "
         "so long and what it will cost over next ten years").split()
VOCAB_SIZE = 512
BLOCK_SIZE = 64


def documents(rng, count):
    """`count` documents of 3-8 sentences of 6-14 words, drawn from a fixed word list."""
    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
    return [" ".join(sentence() for _ in range(rng.randint(3, 8))) for _ in range(count)]


def write_jsonl(path, texts):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def save_model_with_tokenizer(folder, texts):
    """A GPT-2 byte-level BPE of at most VOCAB_SIZE ids trained on `texts`, and a random 2-layer GPT-2 of its
    vocabulary, in one folder; returns the vocabulary size."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=["<|endoftext|>"])
    eot = "<|endoftext|>"  # GPT-2's one special token: document separator, BOS and EOS
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eot, bos_token=eot, unk_token=eot)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64, n_positions=2 * BLOCK_SIZE,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return len(tokenizer)


def prepare(out):
    rng = random.Random(0)
    raw = os.path.join(out, "raw")
    train, val, test = documents(rng, 300), documents(rng, 40), documents(rng, 40)
    write_jsonl(f"{raw}/c4/train.jsonl", train)
    write_jsonl(f"{raw}/c4/val.jsonl", val)
    write_jsonl(f"{raw}/wikitext/test.jsonl", test)
    write_jsonl(f"{raw}/wikitext/validation.jsonl", val)
    model = os.path.join(out, "tiny_gpt2")
    vocab = save_model_with_tokenizer(model, train)
    sys.path.insert(0, REPO_ROOT)
    from data.c4_dataset import prepare as c4_prepare
    from data.wikitext import prepare as wikitext_prepare
    c4_prepare.main(["--tokenizer", model, "--input", f"{raw}/c4/train.jsonl", "--val_files", f"{raw}/c4/val.jsonl",
                     "--num_proc", "1", "--out_dir", f"{out}/c4", "--force"])
    wikitext_prepare.main(["--tokenizer", model, "--input", f"{raw}/wikitext", "--out_dir", f"{out}/wikitext",
                           "--force"])
    flags = ["--config", "cpu_tiny", "--student_model", model, "--teacher_model", model, "--data_dir", f"{out}/c4",
             "--wikitext_dir", f"{out}/wikitext", "--distill_model", "True", "--SLoRB", "True", "--SLoRB_k", "16",
             "--srste_decay", "1e-3", "--block_size", str(BLOCK_SIZE), "--num_threads", "0"]
    with open(os.path.join(out, "run_flags"), "w") as f:
        f.write("\n".join(flags) + "\n")
    print(f"inputs in {out}: tiny_gpt2 (vocabulary {vocab}), c4, wikitext, run_flags")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_check_inputs.py OUT")
    prepare(os.path.abspath(sys.argv[1]))
