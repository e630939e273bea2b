"""Generate text from any model: a checkpoint, an export or Hugging Face folder, a .gguf file or a hub id.

nanoGPT's sample.py, for every model this project loads.

    python sample.py --model out/demo/ast_boosted/seed0/ckpt.pt --start "The city council said" --num_samples 3
    python sample.py --model opt-125m --start FILE:prompt.txt --temperature 0.8 --top_k 200 --seed 1337

The model comes through checkpoint.load_model (GPT-2 or any decoder-only transformers model; masks and SLoRB
included), so what it writes is what the model evaluated in the tables computes. The prompt is encoded and the
samples decoded with the model's own tokenizer (transformers; a folder, a .gguf file or a hub id) when it records
one, else GPT-2's BPE (tiktoken). Each new token: the logits of the last position divided by --temperature, only
the --top_k most likely kept, one token drawn from their softmax with a torch.Generator seeded by --seed (same
seed, same text); --temperature 0 takes the most likely token. Ids beyond the tokenizer's vocabulary (OPT pads
its embedding) are never drawn.
"""
import json

import torch

import cli
from cli import UserError
from sources import MODEL_HELP


def next_token_probs(model, idx, temperature=1.0, top_k=0, vocab_size=None):
    """The distribution the next token is drawn from, (B, vocab): softmax(logits / temperature) over the top_k."""
    logits, _ = model(idx[:, -model.config.block_size:])  # no targets: the last position's logits
    logits = logits[:, -1, :].float()
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits[:, vocab_size:] = -float("inf")
    if temperature == 0:  # greedy: all mass on the most likely token
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits[logits < kth] = -float("inf")
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None, vocab_size=None):
    """idx (B, T) of token ids, extended by max_new_tokens drawn one at a time (nanoGPT's loop)."""
    for _ in range(max_new_tokens):
        probs = next_token_probs(model, idx, temperature, top_k, vocab_size)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx


def model_tokenizer(model):
    """The model's tokenizer (data.tokenizer.Tokenizer): its own folder's, else tiktoken's GPT-2."""
    from checkpoint import tokenizer_info
    from data.tokenizer import get_tokenizer

    info = tokenizer_info(model)
    if not info.get("dir") and model.family != "gpt2":
        raise UserError(f"the model ({model.family}) records no tokenizer folder: sample from a folder that holds "
                        f"its tokenizer files (or an export of it)")
    return get_tokenizer(info["dir"] or None)


@torch.no_grad()
def sample(model, tok, prompt, num_samples=1, max_new_tokens=100, temperature=0.8, top_k=200, seed=1337,
           device="cpu"):
    """num_samples continuations (text after the prompt) of one prompt."""
    ids = tok.encode_stream(prompt) if prompt else []
    if not ids:
        ids = [tok.eos_id]  # nothing to continue: start as after the end of a document
    if len(ids) >= model.config.block_size:
        ids = ids[-(model.config.block_size - 1):]
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, gen, vocab_size=tok.vocab_size)
    return [tok.decode(row[len(ids):].tolist()) for row in out]


def read_prompt(start):
    """--start: the prompt itself, or FILE:path."""
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--start {start}: cannot read the file ({e.strerror})") from None


def main(argv=None):
    from checkpoint import load_model

    p = cli.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--start", action="append", default=None,
                   help="the prompt, or FILE:path to read it from a file; repeat for several prompts, each sampled "
                        "with the same settings and seed (default: a newline)")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="1 = the model's distribution, 0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="", help="also write the prompt, settings and samples as JSON here")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.num_samples < 1 or args.max_new_tokens < 0:
        raise UserError("--temperature and --top_k must be >= 0, --num_samples >= 1, --max_new_tokens >= 0")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    prompts = [read_prompt(start) for start in args.start or ["\n"]]
    model = load_model(args.model).to(args.device).eval()
    tok = model_tokenizer(model)
    runs = []
    for prompt in prompts:
        texts = sample(model, tok, prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                       args.seed, args.device)
        for text in texts:
            print(prompt + text)
            print("---------------")
        runs.append({"prompt": prompt, "samples": texts})
    if args.out:  # "prompt" and "samples": the first prompt's (the one-prompt form); "prompts": all of them
        settings = {k: getattr(args, k) for k in ("num_samples", "max_new_tokens", "temperature", "top_k", "seed")}
        with open(args.out, "w") as f:
            json.dump({"model": args.model, **runs[0], **settings, "prompts": runs}, f, indent=2, ensure_ascii=False)
    texts = runs[0]["samples"] if len(runs) == 1 else [r["samples"] for r in runs]
    return texts


if __name__ == "__main__":
    cli.run(main)
