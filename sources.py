"""What a user passed as a model or a tokenizer, resolved in one place: every flag that takes a model (main.py's
--student_model, --teacher_model and --init_from, the --model of prune.py, evaluate.py, export.py, zeroshot.py
and sample.py) and the data scripts' --tokenizer go through resolve().

    gpt2 ... gpt2-xl    the folder of that name in the project root (gpt2/README.md)
    PATH                a checkpoint (.pt), a sharded checkpoint, an export or a Hugging Face folder, as it is
    PATH.gguf           a GGUF file, read by transformers' GGUF loader (dequantised; needs `pip install gguf`)
    OWNER/NAME          a Hugging Face hub id (e.g. HuggingFaceTB/SmolLM2-135M) that is not a local path,
                        resolved through the Hugging Face cache; downloaded there when online, never when
                        HF_HUB_OFFLINE=1

This module only says where things are; checkpoint.load_model and data.tokenizer load them.
"""
import os
import re
from dataclasses import dataclass

from cli import REPO_ROOT, UserError

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name, as the hub spells repository ids
MODEL_HELP = ("a checkpoint .pt, an export or Hugging Face folder of any decoder-only transformers model (gpt2 "
              "... gpt2-xl name folders in the project root), a .gguf file or a Hugging Face hub id (OWNER/NAME, "
              "through its cache)")
TOKENIZER_HELP = ("tokenise with this model's own tokenizer: its folder, its .gguf file or its hub id (OPT, "
                  "LLaMA, ...; default: tiktoken gpt2)")
# What a model needs from a hub repository: config, weights, tokenizer (not other formats' copies of the weights).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class Source:
    """Where a model (or its tokenizer) is. path: a local file or folder (a hub id's cached snapshot folder; a
    .gguf file's absolute path, so that its tokenizer is loaded once however it was named); gguf_file: the
    .gguf's name when path is one; hub_id: the hub id it was resolved from, if any."""
    path: str
    gguf_file: str = None
    hub_id: str = None

    @property
    def folder(self):
        return os.path.dirname(self.path) if self.gguf_file else self.path

    @property
    def name(self):
        """What to record and show: the hub id, else the absolute path (it stays valid from any directory)."""
        return self.hub_id or os.path.abspath(self.path)

    def pretrained_args(self) -> dict:
        """Keyword arguments for transformers' from_pretrained (AutoConfig, AutoModel..., AutoTokenizer)."""
        args = {"pretrained_model_name_or_path": self.folder, "local_files_only": True}
        return {**args, "gguf_file": self.gguf_file} if self.gguf_file else args


def resolve(name_or_path: str, what="--model") -> Source:
    """The Source of what the user passed (see the module docstring). A path that does not exist and is no hub id
    is returned as it is: the caller says it is not found, naming what it expected there."""
    if name_or_path in GPT2_NAMES and not os.path.exists(name_or_path):
        return Source(os.path.join(REPO_ROOT, name_or_path))
    if os.path.isfile(name_or_path) and name_or_path.lower().endswith(".gguf"):
        return Source(os.path.abspath(name_or_path), gguf_file=os.path.basename(name_or_path))
    if os.path.exists(name_or_path) or not HUB_ID.match(name_or_path) or name_or_path.endswith((".pt", ".gguf")):
        return Source(name_or_path)
    return Source(hub_snapshot(name_or_path, what), hub_id=name_or_path)


def hub_snapshot(repo_id: str, what: str) -> str:
    """The local folder of a hub repository: from the Hugging Face cache, else downloaded into it (online only)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    cache = constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        raise UserError(f"{what} {repo_id}: no such local path, and the Hugging Face hub model {repo_id} is not in "
                        f"the cache ({cache}) while offline (HF_HUB_OFFLINE=1): run `hf download {repo_id}` once on "
                        f"a machine with network (or copy its cache), or pass a local folder or .gguf file")
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # no network, no such repository, gated, ...: all end in the same advice
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
        raise UserError(f"{what} {repo_id}: no such local path, not in the Hugging Face cache ({cache}), and the "
                        f"download failed ({reason}); pass a local folder or .gguf file") from None
