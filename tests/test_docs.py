"""README.md, docs/*.md and the other Markdown pages stay true to the code: every command they quote runs an
existing script with flags that script accepts, every --config names a file, every `module.name` they quote
exists, and every relative link reaches an existing file and heading.

Commands are read from fenced shell blocks (```bash) and from inline code that runs a script (`python bench.py
--preset small`, or `prune.py --method wanda` in prose). Flags come from the scripts themselves without running
them: main.py's from config.TrainConfig, every other script's from the parser its main() builds (main() runs until
parse_args, which hands the parser over instead of parsing), torchrun's from torch.distributed.run."""
import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import sys
from functools import lru_cache
from unittest import mock

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "BENCHMARKS.md", "gpt2/README.md",
         *sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]
# BENCHMARKS.md keeps the names of the commits its older figures were measured at: its commands and links are
# checked, its module names are not.
CURRENT_PAGES = [page for page in PAGES if page != "BENCHMARKS.md"]
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "pt", "bin", "safetensors", "txt", "png", "gguf", "sh"}
SEPARATORS = {";", "&&", "||", "|", "&"}
SHELL_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


class _Captured(BaseException):
    """Raised by the patched parse_args: carries the parser a script's main() has just built (a BaseException, so
    that no `except Exception` in a main() can swallow it and go on without arguments)."""


@lru_cache(maxsize=None)
def accepted_flags(script: str) -> frozenset:
    """Every option string a script accepts (script relative to the repository root)."""
    if script == "main.py":
        import config
        names = [f.name for f in dataclasses.fields(config.TrainConfig)] + list(config.ALIASES)
        return frozenset({"-h", "--help", *(f"--{n}" for n in names)})
    if "ArgumentParser" not in read(script):
        return frozenset()  # a script without flags (its main() may do real work: never call it)
    return frozenset(s for action in _parser_of(script)._actions for s in action.option_strings)


def _parser_of(script: str) -> argparse.ArgumentParser:
    import cli

    def hand_over(parser, *args, **kwargs):
        raise _Captured(parser)

    folder = os.path.dirname(os.path.join(REPO_ROOT, script))
    with _restored_sys_path(), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", hand_over), \
            mock.patch.object(cli.ArgumentParser, "parse_args", hand_over):
        sys.path.insert(0, folder)  # scripts/ import each other as the interpreter would find them
        main = getattr(_import(script), "main", None)
        assert main, f"{script} uses argparse but has no main() to read its flags from"
        try:
            main([]) if inspect.signature(main).parameters else main()
        except _Captured as captured:
            return captured.args[0]
    raise AssertionError(f"{script}: main() finished without calling parse_args")


def _import(script: str):
    dotted = script[:-3].replace("/", ".")
    if not script.startswith("scripts/"):
        return importlib.import_module(dotted)
    spec = importlib.util.spec_from_file_location(f"_docs_{dotted.replace('.', '_')}", os.path.join(REPO_ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _restored_sys_path():
    """Scripts in scripts/ put the repository root on sys.path when imported: take it off again. (Environment
    variables a script sets on import, zeroshot.py's offline switches, stay set, as any test importing it leaves
    them: a later test that imports it again would not set them again.)"""
    path = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = path


@lru_cache(maxsize=None)
def torchrun_flags() -> frozenset:
    from torch.distributed.run import get_args_parser
    return frozenset(s for action in get_args_parser()._actions for s in action.option_strings)


def code(page_text: str):
    """(line number, shell text) of every logical line of a fenced shell block and every inline code span, in page
    order (so that a block's shell variables reach the commands after it)."""
    return sorted([*_shell_lines(page_text), *_inline_spans(page_text)], key=lambda found: found[0])


def _shell_lines(page_text: str):
    fence, pending, start = None, "", 0
    for number, line in enumerate(page_text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence else line.strip()[3:] or "text"
        elif fence in ("bash", "sh", "shell", "console"):
            start = start or number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            pending += line + "\n"
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # a quoted string goes on to the next line
                continue
            yield start, pending
            pending, start = "", 0


def _inline_spans(page_text: str):
    """Inline code outside fences, paragraph by paragraph: a span may wrap onto the next line of its paragraph."""
    paragraphs, fenced = [[]], False
    for number, line in enumerate(page_text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or line.lstrip().startswith("```") or not line.strip():
            paragraphs.append([])
        else:
            paragraphs[-1].append((number, line))
    for paragraph in filter(None, paragraphs):
        text = "\n".join(line for _, line in paragraph)
        for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
            yield paragraph[0][0] + text.count("\n", 0, match.start()), match.group(1).replace("\n", " ")


def tokens(text: str) -> list:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def commands(page_text: str):
    """(line, launcher tokens, script, its arguments) of every command that runs a .py file, with the shell
    variables a block sets (M=opt-125m, O="--student_model $M ...") substituted as the shell would."""
    variables = {}
    for number, text in code(page_text):
        text = SHELL_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)
        segment = []
        for token in tokens(text) + [";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Za-z_]\w*=.*", segment[0], re.S):
                name, value = segment.pop(0).split("=", 1)
                variables[name] = value
            found = _script_call(segment)
            if found:
                yield (number, *found)
            segment = []


def _script_call(segment):
    """The launcher, script and arguments of `[prefix] python X.py ...`, `torchrun ... X.py ...` or `X.py --flag`."""
    for i, token in enumerate(segment):
        if not token.endswith(".py"):
            continue
        before = segment[:i]
        if before and os.path.basename(before[-1]) in ("python", "python3"):
            return before[-1:], token, segment[i + 1:]
        if "torchrun" in before:
            return before[before.index("torchrun"):], token, segment[i + 1:]
        if not before and any(a.startswith("--") for a in segment[i + 1:]):
            return [], token, segment[i + 1:]  # inline prose: `prune.py --method wanda`
        return None
    return None


def problems_with_command(launcher, script, args):
    from cli import did_you_mean
    if "$" in script:
        return []
    script = os.path.normpath(script)
    if not os.path.isfile(os.path.join(REPO_ROOT, script)):
        return [f"{script} does not exist"]
    out = []
    if launcher and launcher[0] == "torchrun":
        out += [f"torchrun has no flag {a.split('=')[0]}" for a in launcher[1:]
                if a.startswith("-") and a.split("=")[0] not in torchrun_flags()]
    flags = accepted_flags(script)
    for i, arg in enumerate(args):
        arg = arg.strip("[]")
        name = arg.split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w-]*", name) and name not in flags:
            hint = did_you_mean(name.lstrip("-"), [f.lstrip("-") for f in flags]) if flags else " (it takes none)"
            out.append(f"{script} has no flag {name}{hint}")
        if script == "main.py" and name == "--config":
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            out += _config_file_problem(value)
    return out


def _config_file_problem(value):
    import config
    from cli import UserError
    if "$" in value:
        return []
    try:
        config.load_config_file(value)
    except UserError as e:
        return [f"--config {value}: {e}"]
    return []


def slug(heading: str, seen: dict) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    base = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


@lru_cache(maxsize=None)
def anchors(path: str) -> frozenset:
    seen, out, fenced = {}, set(), False
    for line in read(path).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.add(slug(line.lstrip("#"), seen))
    return frozenset(out)


def links(page_text: str):
    """(line number, target) of every Markdown link outside code."""
    fenced = False
    for number, line in enumerate(page_text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose = re.sub(r"`[^`]*`", "", line)
            for target in re.findall(r"\]\(([^)\s]+)\)", prose):
                yield number, target


def read(page):
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_every_quoted_command_names_a_script_and_only_flags_it_accepts(page):
    bad = [f"{page}:{line}: {problem}" for line, launcher, script, args in commands(read(page))
           for problem in problems_with_command(launcher, script, args)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_reaches_a_file_and_heading(page):
    bad = []
    for line, target in links(read(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(REPO_ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{page}:{line}: {target}: {path} does not exist")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{page}:{line}: {target}: no heading #{anchor} in {os.path.relpath(full, REPO_ROOT)}")
    assert not bad, "\n".join(bad)


def quoted_names(page_text: str):
    """(line, module, name) of every `module.name` in inline code and every `from module import a, b` in a code
    block, where module is one of the project's own files (`checkpoint.load_model`, not `torch.topk`)."""
    found = [(line, *m.groups()) for line, span in _inline_spans(page_text)
             for m in [re.fullmatch(r"([a-z_]\w*)\.([A-Za-z_]\w*)(\(.*\))?", span.strip())] if m]
    for number, line in enumerate(page_text.splitlines(), 1):
        m = re.match(r"\s*from ([a-z_]\w*) import (.+)", line)
        if m:
            found += [(number, m.group(1), name.strip().split(" ")[0]) for name in m.group(2).split(",")]
    return [(line, module, name) for line, module, name, *_ in found
            if name not in FILE_SUFFIXES and os.path.isfile(os.path.join(REPO_ROOT, module + ".py"))]


@pytest.mark.parametrize("page", CURRENT_PAGES)
def test_every_quoted_module_name_exists(page):
    bad = [f"{page}:{line}: {module}.{name} does not exist" for line, module, name in quoted_names(read(page))
           if not hasattr(importlib.import_module(module), name)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_bad_flag_a_missing_script_and_a_missing_config():
    page = ("```bash\nM=x O=\"--no_such_flag 1\"\ntorchrun --nproc_per_node=2 --bogus 1 main.py --config nope $O\n"
            "python missing.py --a 1\n```\nand `prune.py --method wanda --wat`\n")
    found = [(line, problem) for line, launcher, script, args in commands(page)
             for problem in problems_with_command(launcher, script, args)]
    assert [line for line, _ in found] == [3, 3, 3, 4, 6]
    assert "torchrun has no flag --bogus" in found[0][1] and "--config nope" in found[1][1]
    assert "main.py has no flag --no_such_flag" in found[2][1] and "missing.py does not exist" in found[3][1]
    assert "prune.py has no flag --wat" in found[4][1]
    # a wrapped inline span, a module name, and what is not one (a file name, torch's own)
    prose = ("the one loader, `checkpoint.load_model`, reads\n`results.json`; `torch.topk` and `python\n"
             "sample.py --temprature 0`")
    assert quoted_names(prose) == [(1, "checkpoint", "load_model")]
    assert [(line, problems_with_command(*call)) for line, *call in commands(prose)] == \
        [(2, ["sample.py has no flag --temprature (did you mean --temperature?)"])]
