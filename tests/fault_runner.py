"""Run main.py with one fault injected at a chosen point (used by tests/test_faults.py only).

    python tests/fault_runner.py KIND N [main.py flags...]

KIND says where the process SIGKILLs itself, at the N-th (1-based) occurrence:
  forward       the N-th GPT forward (student or teacher, training or evaluation)
  eval          the N-th evaluation batch
  write         the N-th torch.save, after half of its bytes reached the temporary file
  install       the N-th rename of a finished checkpoint file into place (e.g. between ckpt-ITER.pt and ckpt.pt)
or sends itself SIGINTs (what Ctrl-C sends), as a user would, at a moment chosen exactly:
  sigint-eval   one SIGINT at the N-th evaluation batch
  sigint2-step  two SIGINTs at the N-th training forward (of the student)
  sigint3-step  three SIGINTs at the N-th training forward
The kill is real (SIGKILL: no handler, no cleanup); everything else is main.py as users run it.
"""
import io
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint  # noqa: E402
import cli  # noqa: E402
import evaluate  # noqa: E402
import main  # noqa: E402
import model  # noqa: E402


def at_nth(fn, n, fault):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            fault(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def die(*_, **__):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(obj, path, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()


def sigints(count):
    def send(*_, **__):
        for _ in range(count):
            os.kill(os.getpid(), signal.SIGINT)
    return send


def at_nth_training_forward(forward, n, fault):
    calls = [0]

    def wrapper(self, *args, **kwargs):
        calls[0] += self.training
        if self.training and calls[0] == n:
            fault()
        return forward(self, *args, **kwargs)
    return wrapper


if __name__ == "__main__":
    kind, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_save = checkpoint.torch.save
    if kind == "forward":
        model.GPT.forward = at_nth(model.GPT.forward, n, die)
    elif kind == "eval":
        evaluate._nll_sum = at_nth(evaluate._nll_sum, n, die)
    elif kind == "write":
        checkpoint.torch.save = at_nth(real_save, n, half_written)
    elif kind == "install":
        checkpoint._install = at_nth(checkpoint._install, n, die)
    elif kind == "sigint-eval":
        evaluate._nll_sum = at_nth(evaluate._nll_sum, n, sigints(1))
    elif kind in ("sigint2-step", "sigint3-step"):
        model.GPT.forward = at_nth_training_forward(model.GPT.forward, n, sigints(int(kind[6])))
    else:
        raise SystemExit(f"unknown fault kind {kind!r}")
    cli.run(main.main, argv)
