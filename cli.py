"""Command-line plumbing shared by every script: a user's mistake ends in one line and exit code 2.

Exit codes of every script: 0 done; 1 a bug (traceback); 2 a problem the user can fix (one line: what is wrong
and what to do); 3 main.py stopped by a signal after saving its checkpoint (resume with --init_from resume);
130 Ctrl-C anywhere else (start-up, prune.py, evaluate.py, ...); 141 stdout was closed early
(`main.py -h | head`). Under torchrun only rank 0 prints the line; torchrun adds its own failure summary.
"""
import argparse
import difflib
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_ENV = "SPARSE_GPT2_DATA"
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_KEYBOARD_INTERRUPT, EXIT_BROKEN_PIPE = 2, 3, 130, 141


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...). Printed as one line, exit code 2."""


class Interrupted(Exception):
    """A run stopped by a signal after saving what is consistent. Printed as one line, exit code 3."""


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise UserError(f"expected a boolean (True/False/true/false/1/0), got {value!r}")


def did_you_mean(name: str, known) -> str:
    """' (did you mean --x?)' for the closest known flag name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


def check_device(device: str) -> str:
    """'auto' -> cuda if available, else cpu; a GPU that is not there is a one-line error, not an assertion."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but no CUDA GPU is visible to torch: use --device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps but MPS is not available on this machine: use --device cpu")
    elif device != "cpu":
        raise UserError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def default_data_root() -> str:
    """The shared data folder: $SPARSE_GPT2_DATA, else ../shared/data beside the project."""
    return os.environ.get(DATA_ENV) or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def temp_name(path):
    """A hidden sibling name: an interrupted write leaves `.train.bin.PID.tmp`, never a short `train.bin`."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def write_text(path, text):
    """Write text to path whole or not at all: a hidden temporary sibling, fsynced, then a rename (a crash or a
    failed write leaves the previous file as it was, and no temporary file behind)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """Write obj as JSON (indented, UTF-8), whole or not at all (write_text)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_model_config(path) -> dict:
    """config.json of a local Hugging Face model folder, with one-line errors for a missing or broken folder."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model folder {path} not found: pass a Hugging Face model folder, a .gguf file, a hub id, "
                        f"an export folder or a checkpoint .pt")
    if not os.path.isfile(cfg_file):
        raise UserError(f"{cfg_file} not found: {path} is not a Hugging Face model folder")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e})") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump), a mistyped flag gets a
    "did you mean", and a --device flag is checked against the machine (cli.check_device)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for arg in argv:  # before argparse, whose "required" error would hide the typo
            name = arg.split("=", 1)[0]
            if name.startswith("--") and len(name) > 2 and not any(f.startswith(name) for f in flags):
                raise UserError(f"unknown flag {name}{did_you_mean(name[2:], [f[2:] for f in flags])} "
                                f"(see {self.prog} --help)")
        parsed = super().parse_args(argv, namespace)
        if isinstance(getattr(parsed, "device", None), str):
            parsed.device = check_device(parsed.device)
        return parsed


def is_rank_zero() -> bool:
    """False on every torchrun worker but rank 0, which alone speaks for all of them."""
    return os.environ.get("RANK", "0") == "0"


def _report(message: str):
    """One line on stderr (rank 0 only under torchrun); torchrun's failure summary then shows it too."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun prints this as the rank's "traceback" instead of a link to its docs
        try:
            with open(error_file, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    if not is_rank_zero():
        # Every rank usually meets the same error at once. Whichever exits first makes torchrun stop the others,
        # so the other ranks wait a moment: rank 0 prints its line and exits first, and the line never goes
        # missing (it did, now and then, when rank 1 won the race).
        time.sleep(3)


def run(main, *args, **kwargs):
    """Call main(); user errors, interrupts and a closed stdout become one line and their exit code."""
    try:
        result = main(*args, **kwargs)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return result
    except UserError as e:
        _report(f"error: {e}")
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as e:
        _report(str(e))
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _report("interrupted")
        sys.exit(EXIT_KEYBOARD_INTERRUPT)
    except BrokenPipeError:
        # the reader went away (`main.py -h | head`): say nothing more, and let the exit not flush into the pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress of long work: a tqdm bar on a terminal, else plain lines with the elapsed time and an ETA.

    Off a terminal (a log file, a job scheduler's output) a bar is a wall of carriage returns, and nothing at all
    while tqdm is disabled, so a 7B pruning would run for hours in silence. There each update prints one line on
    stdout, at most one per `every` seconds (0: every update), and always the last:

        wanda: block 7/30 (23%), 1m05s elapsed, ETA 3m36s

    enabled=False says nothing at all; on a terminal the bar goes to stderr as tqdm's always did.
    """

    def __init__(self, total: int, desc: str, unit: str = "", enabled: bool = True, every: float = 30.0,
                 initial: int = 0, terminal=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = self.start_done = initial
        self.enabled = enabled
        self.bar = None
        self.t0 = self.last = time.time()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        if enabled and terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.time() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else None
        what = f"{self.unit} " if self.unit else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {_duration(left)}" if left is not None and self.done < self.total else ""
        return f"{self.desc}: {what}{self.done}/{self.total}{share}, {_duration(elapsed)} elapsed{eta}"

    def update(self, n: int = 1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.total or time.time() - self.last >= self.every):
            self.last = time.time()
            print(self.line(), flush=True)

    def write(self, text: str):
        """A log line that does not break the bar."""
        (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()
