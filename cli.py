"""Command-line plumbing shared by every script: a user's mistake ends in one line and exit code 2."""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_ENV = "SPARSE_GPT2_DATA"


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...). Printed as one line, exit code 2."""


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise UserError(f"expected a boolean (True/False/true/false/1/0), got {value!r}")


def default_data_root() -> str:
    """The shared data folder: $SPARSE_GPT2_DATA, else ../shared/data beside the project."""
    return os.environ.get(DATA_ENV) or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def read_model_config(path) -> dict:
    """config.json of a local Hugging Face model folder, with one-line errors for a missing or broken folder."""
    import json

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model folder {path} not found: pass a Hugging Face model folder (model_type gpt2, opt, "
                        f"llama, mistral or qwen2), an export folder or a checkpoint .pt")
    if not os.path.isfile(cfg_file):
        raise UserError(f"{cfg_file} not found: {path} is not a Hugging Face model folder")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e})") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def run(main, *args, **kwargs):
    """Call main(); a UserError becomes 'error: ...' on stderr and exit code 2, without a traceback."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
