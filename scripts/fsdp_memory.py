"""Memory per rank of AST training state, DDP vs FSDP, by calculation (docs/scaling.md's LLaMA-2-7B table).

    python scripts/fsdp_memory.py                       # LLaMA-2-7B, 8 ranks, SLoRB k=16 trainable
    python scripts/fsdp_memory.py --ranks 16 --slorb_k 0

fp32 weights, fp32 gradients, AdamW's two fp32 moments, a bool mask and initial mask per masked weight, a bf16
teacher of the student's size. Activations and the block being gathered are not included (see docs/scaling.md).
"""
import argparse

GB = 1e9


def llama_counts(layers, d, ff, vocab, slorb_k):
    """(masked block-linear weights, all dense parameters, SLoRB S + trainable X) of a LLaMA-shaped model."""
    linears = [(d, d)] * 4 + [(ff, d)] * 2 + [(d, ff)]  # q, k, v, o; gate, up: (out, in); down
    masked = layers * sum(o * i for o, i in linears)
    dense = masked + 2 * vocab * d + layers * 2 * d + d  # + embeddings, untied head, RMSNorms
    slorb = layers * sum(o * (i // slorb_k) + (i // slorb_k) * i for o, i in linears) if slorb_k else 0
    return masked, dense, slorb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--slorb_k", type=int, default=16, help="0 = no SLoRB")
    p.add_argument("--ranks", type=int, default=8)
    a = p.parse_args(argv)
    masked, dense, slorb = llama_counts(a.layers, a.width, a.ffn, a.vocab, a.slorb_k)
    trained = dense + slorb
    parts = {"weights": 4 * trained, "gradients": 4 * trained, "AdamW moments": 8 * trained,
             "masks": 2 * masked, "teacher (bf16)": 2 * dense}
    print(f"{dense / 1e9:.2f} B dense parameters, {masked / 1e9:.2f} B masked, SLoRB {slorb / 1e9:.2f} B, "
          f"{trained / 1e9:.2f} B trained")
    print(f"| per rank, {a.ranks} GPUs | " + " | ".join(parts) + " | total |")
    print("|---" * (len(parts) + 2) + "|")
    for name, share in (("DDP (everything replicated)", 1), (f"FSDP (sharded over {a.ranks})", a.ranks)):
        cells = [f"{v / share / GB:.1f} GB" for v in parts.values()]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(parts.values()) / share / GB:.1f} GB |")
    return parts


if __name__ == "__main__":
    main()
