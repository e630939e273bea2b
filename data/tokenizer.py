"""The GPT-2 tokenizer (tiktoken `gpt2`), loaded offline when possible: one function every script uses.

Where the BPE files come from, in order:
  1. an explicit `tokenizer_dir` holding `encoder.json` + `vocab.bpe` (OpenAI names) or
     `vocab.json` + `merges.txt` (Hugging Face names, e.g. a downloaded `gpt2/` model folder);
  2. `$TIKTOKEN_CACHE_DIR`, when it already holds tiktoken's cached gpt2 files;
  3. the shared data folder, `default_data_root()/gpt2_tokenizer`;
  4. tiktoken's own download (needs network).
Nothing is ever written, so every folder may be read-only.
"""
import functools
import hashlib
import json
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's own gpt2 split regex

from cli import UserError, default_data_root
from sources import resolve

EOT = 50256  # <|endoftext|>, appended after every document
EOT_STR = "<|endoftext|>"
VOCAB_SIZE = 50257

# The files tiktoken downloads for `gpt2`, with the sha256 it pins; its cache names them sha1(url).
_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

TOKENIZER_DIR_HELP = "folder with encoder.json + vocab.bpe, or Hugging Face vocab.json + merges.txt"
_FILE_PAIRS = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]  # (vocab, merges)


def _gpt2_byte_decoder() -> dict:
    """GPT-2 stores each byte as a printable character; this maps those characters back to bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    decoder = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + n)] = b
            n += 1
    return decoder


def _encoding_from_bpe_files(vocab_bytes: bytes, merges_bytes: bytes, where: str) -> tiktoken.Encoding:
    """Build tiktoken's gpt2 Encoding from encoder.json/vocab.json and vocab.bpe/merges.txt contents."""
    byte_decoder = _gpt2_byte_decoder()
    try:
        vocab = json.loads(vocab_bytes)
        ranks = {bytes(byte_decoder[c] for c in token): rank for token, rank in vocab.items() if token != EOT_STR}
        merges = [line.split() for line in merges_bytes.decode("utf-8").splitlines()[1:] if line.strip()]
        # tiktoken needs rank order == merge order; a vocabulary from another tokenizer fails here, not later.
        consistent = (len(ranks) == EOT and vocab.get(EOT_STR) == EOT and len(merges) == EOT - 256 and all(
            ranks.get(bytes(byte_decoder[c] for c in a + b)) == 256 + i for i, (a, b) in enumerate(merges)))
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{where}: cannot read the GPT-2 BPE files ({type(e).__name__}: {e})")
    if not consistent:
        raise UserError(f"{where}: these are not the GPT-2 BPE files (vocabulary and merges do not match GPT-2)")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_STR: EOT}, explicit_n_vocab=VOCAB_SIZE)


def _find_pair(folder: str):
    """The (vocab, merges) paths in folder, or None."""
    for vocab_name, merges_name in _FILE_PAIRS:
        vocab, merges = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return vocab, merges
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _from_folder(folder: str) -> tiktoken.Encoding:
    vocab, merges = _find_pair(folder)
    return _encoding_from_bpe_files(_read(vocab), _read(merges), folder)


def _from_tiktoken_cache(cache_dir: str):
    """The encoding from a tiktoken cache folder, or None when the cache lacks the gpt2 files."""
    paths = [os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
             for url in (_ENCODER_JSON_URL, _VOCAB_BPE_URL)]
    if not all(os.path.isfile(p) for p in paths):
        return None
    encoder, merges = _read(paths[0]), _read(paths[1])
    if (hashlib.sha256(encoder).hexdigest(), hashlib.sha256(merges).hexdigest()) != (
            _ENCODER_JSON_SHA256, _VOCAB_BPE_SHA256):
        return None  # a stale or partial cache; tiktoken would re-download it too
    return _encoding_from_bpe_files(encoder, merges, cache_dir)


@functools.lru_cache(maxsize=None)
def _load(tokenizer_dir, cache_dir, data_root):
    """(encoding, where it came from). Cached per source, so env changes are still honoured."""
    if tokenizer_dir:
        # An explicit choice must not silently fall back to something else.
        if not os.path.isdir(tokenizer_dir):
            raise UserError(f"--tokenizer_dir {tokenizer_dir} is not a folder")
        if _find_pair(tokenizer_dir) is None:
            raise UserError(f"--tokenizer_dir {tokenizer_dir} holds neither encoder.json + vocab.bpe "
                            "nor vocab.json + merges.txt")
        return _from_folder(tokenizer_dir), tokenizer_dir
    if cache_dir:
        enc = _from_tiktoken_cache(cache_dir)
        if enc is not None:
            return enc, f"TIKTOKEN_CACHE_DIR={cache_dir}"
    shared = os.path.join(data_root, "gpt2_tokenizer")
    if os.path.isdir(shared) and _find_pair(shared) is not None:
        return _from_folder(shared), shared
    try:
        return tiktoken.get_encoding("gpt2"), "tiktoken download"
    except Exception as e:  # no network, read-only cache, ...: all end in the same advice
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise UserError(
            "GPT-2 tokenizer files not found and tiktoken could not download them "
            f"({reason}); put encoder.json + vocab.bpe (or Hugging Face vocab.json + merges.txt) in a folder "
            f"and pass --tokenizer_dir FOLDER, or copy them to {shared}/, "
            "or set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds the gpt2 files")


def get_gpt2_encoding(tokenizer_dir=None) -> tiktoken.Encoding:
    """tiktoken's `gpt2` Encoding ("Hello world" -> [15496, 995]), loaded once per process."""
    return _load(tokenizer_dir or None, os.environ.get("TIKTOKEN_CACHE_DIR") or None, default_data_root())[0]


def tokenizer_source(tokenizer_dir=None) -> str:
    """Where get_gpt2_encoding(tokenizer_dir) found its files, for meta.json."""
    return _load(tokenizer_dir or None, os.environ.get("TIKTOKEN_CACHE_DIR") or None, default_data_root())[1]


# ---------------------------------------------------------------------------------------------- any model's tokenizer
# A tokenizer's identity, as far as token files are concerned: its vocabulary size and the ids it gives a fixed
# text. Two tokenizers with the same fingerprint make the same token files (GPT-2's Hugging Face files and
# tiktoken's gpt2 do; OPT's tokenizer, the same BPE with other ids, does not).
PROBE = ("The quick brown fox jumps over the lazy dog. It's 1,234.5 km away -- isn't it?\n\n"
         "  Indented: naïve café, Ünïcödé, 東京, emoji 🙂, tabs\tand (brackets) [x] {y} <z> & 'quotes' \"here\".")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model")


def fingerprint(probe_ids, vocab_size) -> str:
    return hashlib.sha256(json.dumps([int(vocab_size), [int(i) for i in probe_ids]]).encode()).hexdigest()[:16]


def has_hf_tokenizer(folder) -> bool:
    """Does the folder hold files AutoTokenizer can load (tokenizer.json, tokenizer.model or vocab + merges)?"""
    if not folder or not os.path.isdir(folder):
        return False
    exists = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return exists("tokenizer.json") or exists("tokenizer.model") or (exists("vocab.json") and exists("merges.txt"))


class Tokenizer:
    """What the prepare scripts need of a tokenizer: tiktoken's gpt2 (the default) or a model folder's own.

    encode_document: a C4 document's ids, no special tokens (the prepare script appends eos after each);
    encode_stream: a whole text as Wanda/SparseGPT tokenise WikiText-2 (the tokenizer's own special tokens,
    i.e. one BOS at the very start for OPT and LLaMA, none for GPT-2); decode: ids back to text (sample.py).
    """

    def __init__(self, name, vocab_size, eos_id, encode_document, encode_stream, source, decode):
        self.name, self.vocab_size, self.eos_id, self.source = name, vocab_size, eos_id, source
        self.encode_document, self.encode_stream, self.decode = encode_document, encode_stream, decode
        self.dtype = "uint16" if vocab_size <= 2 ** 16 else "uint32"
        self.fingerprint = fingerprint(encode_document(PROBE), vocab_size)

    def meta(self, method):
        return {"name": self.name, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
                "method": method, "loaded_from": self.source}


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(source):
    """transformers' tokenizer of a sources.Source (a folder, or a .gguf file that stores its tokenizer)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # e.g. "sequence longer than the model's maximum"
    folder = source.folder
    try:
        if not source.gguf_file and not any(os.path.isfile(os.path.join(folder, f))
                                            for f in ("tokenizer_config.json", "tokenizer.json")):
            # bare GPT-2 BPE files (vocab.json + merges.txt, e.g. the shared gpt2_tokenizer/hf): nothing tells
            # AutoTokenizer the class, and these two files only ever mean GPT-2's byte-level BPE
            return transformers.GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(**source.pretrained_args())
    except Exception as e:  # a broken or foreign tokenizer file: all the same to the user
        raise UserError(f"--tokenizer {source.name}: transformers cannot load its tokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def hf_tokenizer(name_or_path, what="--tokenizer"):
    """(transformers tokenizer, sources.Source) of a model folder, a .gguf file or a hub id (sources.resolve)."""
    source = resolve(name_or_path, what)
    if not source.gguf_file:
        if not os.path.isdir(source.path):
            raise UserError(f"{what} {name_or_path} is not a folder, a .gguf file or a hub id: pass the model "
                            "(a folder that holds its tokenizer, its .gguf file or its hub id)")
        if not has_hf_tokenizer(source.path):
            raise UserError(f"{what} {name_or_path} holds no tokenizer (tokenizer.json, tokenizer.model or "
                            "vocab.json + merges.txt): copy the model's tokenizer files there")
    return _hf_tokenizer(source), source


@functools.lru_cache(maxsize=None)
def get_tokenizer(tokenizer=None, tokenizer_dir=None) -> Tokenizer:
    """tokenizer: a model whose own tokenizer to use, as a folder, a .gguf file or a hub id (transformers'
    AutoTokenizer, offline); None: tiktoken's gpt2 (its BPE files found as get_gpt2_encoding(tokenizer_dir)
    finds them)."""
    if not tokenizer:
        enc = get_gpt2_encoding(tokenizer_dir)
        return Tokenizer("tiktoken gpt2", VOCAB_SIZE, EOT, enc.encode_ordinary, enc.encode_ordinary,
                         tokenizer_source(tokenizer_dir), enc.decode)
    tok, source = hf_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise UserError(f"--tokenizer {tokenizer}: the tokenizer has no end-of-text (eos) token to separate documents")
    name = os.path.basename(os.path.normpath(source.hub_id or source.path)) + f" ({type(tok).__name__})"
    return Tokenizer(name, len(tok), tok.eos_token_id,
                     lambda text: tok(text, add_special_tokens=False)["input_ids"],
                     lambda text: tok(text)["input_ids"], source.name,
                     lambda ids: tok.decode(ids))


def has_tokenizer(name_or_path) -> bool:
    """Does this model source (a folder, a .gguf file or a cached hub id) hold a tokenizer of its own?"""
    try:
        source = resolve(name_or_path)
    except UserError:  # a hub id no longer cached
        return False
    return bool(source.gguf_file) or has_hf_tokenizer(source.path)


@functools.lru_cache(maxsize=None)
def tokenizer_fingerprint(name_or_path):
    """The fingerprint of a model source's own tokenizer (a folder, a .gguf file or a hub id), or None when it
    holds none."""
    return get_tokenizer(name_or_path).fingerprint if has_tokenizer(name_or_path) else None


def prepare_flag(model_source) -> str:
    """The --tokenizer part of a prepare-script command that makes data for this model (what a missing-data hint
    names): '' for GPT-2 (the scripts' default), else ' --tokenizer SOURCE' (its folder, .gguf file or hub id).
    Read from the source without loading the model, so that a missing file is reported before that work."""
    if not model_source or model_source == "scratch":  # main.py's pretraining from scratch is GPT-2
        return ""
    try:
        source = resolve(model_source)
    except UserError:  # a hub id that is not cached: its own error comes when the model is loaded
        return f" --tokenizer {model_source}"
    config = os.path.join(source.path, "config.json")
    if not source.gguf_file and os.path.isfile(config):
        try:
            with open(config) as f:
                if json.load(f).get("model_type") == "gpt2":
                    return ""
        except ValueError:
            pass
    elif not source.gguf_file:  # a checkpoint: which tokenizer it records is not read here
        return " --tokenizer MODEL (the model's folder, .gguf file or hub id; none for GPT-2)"
    return f" --tokenizer {model_source}"


@functools.lru_cache(maxsize=None)
def gpt2_fingerprint():
    """tiktoken gpt2's fingerprint (None when its files cannot be found offline)."""
    try:
        return get_tokenizer().fingerprint
    except UserError:
        return None
