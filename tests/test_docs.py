"""Docs that cannot lie: every code block of the documentation runs, every documented command line parses, and every
link resolves. CONTRIBUTING.md ("The docs test") gives the rules for writers; in short, for each page (README.md,
CONTRIBUTING.md, examples/README.md, benchmarks/README.md, docs/**/*.md: every Markdown file outside tests/):

- ```python blocks run in order in one fresh interpreter per page, like a notebook; the working directory is a
  temporary copy of the page's folder (its files), the repository is on PYTHONPATH, and nothing may reach the Hub.
- ```bash blocks run with bash from a temporary copy of the repository (so that what they write, `outputs/` above all,
  lands there), commands split at `&&` and line ends. A command that starts a script of `TINY_FLAGS` runs with that
  row's flags appended: the last value of a flag wins, so the command runs as written, at a tiny size. Each script
  runs once per session, at its first bash command (README.md first); a later bash command of the same script is
  parsed, like inline code. A command that starts as a row of `NOT_RUN` is left out, for the reason the row gives.
- Commands in inline code (`python examples/...`) and in ```text blocks (the commands that need GPUs, data or the
  Hub) are not run: their arguments are parsed by the script's own parser, and its launcher's by the launcher's, in
  this process. A command holding a placeholder (`...`, `<...>`, `[...]`) is not parsed.
- Every relative link and every #anchor resolves: the file or folder exists, and the anchor is a heading of the page it
  points to, by GitHub's rules (lower case; every character but letters, digits, `_`, `-` and spaces dropped; spaces
  to `-`; a repeated heading gets `-1`, `-2`, ...).

The whole test takes about a minute of one core's time; CONTRIBUTING.md says how to keep it so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import offline_env

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# How the bash blocks run: the tiny settings of each script, and the commands that are not run.

TINY_MAE = (
    "image_size=16,patch_size=4,hidden_size=24,num_hidden_layers=4,num_attention_heads=2,intermediate_size=48,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)
"""A ViTMAE of 4 blocks of width 24 on 16 px images (4 blocks: the fewest the segmentation backbone's neck takes)."""
TINY_LLAMA = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2,intermediate_size=48,"
    "max_position_embeddings=64"
)
QUIET = "--report_to none --track_emissions false --dataloader_num_workers 0"
MAE_DATA = (
    f"--config_overrides {TINY_MAE} --max_steps 2 --per_device_train_batch_size 4 --max_train_samples 8 "
    "--max_eval_samples 4"
)
CLM_DATA = (
    f"--model_type llama --config_overrides {TINY_LLAMA} --block_size 32 --tokenizer_vocab_size 300 --max_steps 2"
)


@dataclass(frozen=True)
class Tiny:
    flags: str
    """Appended to the command."""
    output_dir: str | None = None
    """Where the script's demo writes (its output without arguments), given when the command names no --output_dir:
    the flags make the command's arguments non-empty, and a script's defaults apply only without any."""


TINY_FLAGS: dict[str, Tiny] = {
    "examples/run_mae_dbp.py": Tiny(
        f"{MAE_DATA} --per_device_eval_batch_size 4 --logging_steps 1 {QUIET}", output_dir="outputs/mae-dbp-demo"
    ),
    "examples/run_clm_dbp.py": Tiny(
        f"{CLM_DATA} --max_train_samples 16 --max_eval_samples 8 --per_device_train_batch_size 4 "
        f"--per_device_eval_batch_size 4 {QUIET}",
        output_dir="outputs/clm-dbp-demo",
    ),
    "examples/run_segmentation.py": Tiny(
        "--data_dir outputs/ade20k-demo --crop_size 32 --upernet_hidden_size 16 --auxiliary_channels 8 --max_steps 2 "
        "--max_train_samples 4 --max_eval_samples 2 --per_device_train_batch_size 2 --per_device_eval_batch_size 2 "
        f"--num_visualized 2 {QUIET}",
        output_dir="outputs/upernet-dbp-demo",
    ),
    "examples/compare_bp_dbp.py": Tiny(f"{MAE_DATA} --seeds 0 --eval_steps 1"),
    "examples/compare_bp_dbp_clm.py": Tiny(
        f"{CLM_DATA} --seeds 0 --eval_steps 1 --per_device_train_batch_size 4 --max_eval_samples 8"
    ),
    "examples/sweep_bp_dbp.py": Tiny(f"{MAE_DATA} --seeds 0 --eval_steps 1 --variants bp dbp"),
}
"""How a bash block's command that starts one of these scripts (through `python`, `accelerate launch` or `torchrun`)
runs: with the row's flags appended, so the same command at a tiny size, in seconds. `--data_dir outputs/ade20k-demo`
is the folder that run_segmentation.py fills with its generated demo set. A bash block that starts a script of
examples/ or benchmarks/ without a row here (or in `NOT_RUN`) fails: at full size it would take minutes."""


@dataclass(frozen=True)
class NotRun:
    reason: str
    in_ci: bool = False
    """The command is one of .ci/run's (`--quiet` aside): checked by `test_the_commands_left_out_are_those_ci_runs`."""


NOT_RUN: dict[str, NotRun] = {
    "pip install": NotRun("installing is CI's part: .ci/run runs it in a fresh virtual environment", in_ci=True),
    "python -m pytest tests": NotRun("the test suite, of which this test is part: .ci/run runs it", in_ci=True),
    "python -m pytest": NotRun("a part of the test suite, of which this test is part"),
    "accelerate launch --config_file examples/accelerate_configs/cpu_2_processes.yaml": NotRun(
        "two processes take longer than the docs test's budget: tests/test_distributed.py launches them"
    ),
    "torchrun --nproc_per_node 2": NotRun(
        "two processes take longer than the docs test's budget: tests/test_distributed.py and "
        "tests/test_collectives.py launch them"
    ),
}
"""Commands of bash blocks that the docs test leaves out, by how they start, and why."""

# ---------------------------------------------------------------------------------------------------------------------
# Pages, blocks, commands


def documentation_pages() -> list[str]:
    """Every Markdown file of the repository but the tests' (fixtures hold model cards) and build outputs."""
    skipped = {"tests", "outputs", "build", "dist", "node_modules", "venv"}
    pages = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not (d in skipped or d.startswith(".") or d.endswith(".egg-info"))]
        pages += [(Path(folder) / f).relative_to(ROOT).as_posix() for f in files if f.endswith(".md")]
    return sorted(pages)


PAGES = documentation_pages()


@dataclass(frozen=True)
class Block:
    page: str
    language: str
    line: int
    """Line of the page where the block's text begins (1-based)."""
    text: str


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")


def read_page(page: str, root: Path = ROOT) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a page, and its lines with every block's lines blanked (the prose)."""
    lines = (root / page).read_text(encoding="utf-8").splitlines()
    blocks, prose, i = [], list(lines), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0]) * len(fence)}+[ \t]*$", lines[end]):
            end += 1
        body = [line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1 : end]]
        blocks.append(Block(page, opening["info"].lower(), i + 2, "\n".join(body) + "\n"))
        for j in range(i, min(end + 1, len(lines))):
            prose[j] = ""
        i = end + 1
    return blocks, prose


def inline_code(prose: list[str]) -> list[str]:
    return [m.group(1).strip() for line in prose for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", line)]


def split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, current, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif text.startswith(separator, i):
            parts.append(current)
            current, i = "", i + len(separator)
            continue
        current += c
        i += 1
    return [*parts, current]


def shell_lines(text: str) -> list[str]:
    """The logical lines of a shell block (continuation lines joined), without their comments."""
    joined = re.sub(r"\\\n", " ", text)
    lines = []
    for line in joined.splitlines():
        code = split_outside_quotes(line, " #")[0] if not line.lstrip().startswith("#") else ""
        if code.strip():
            lines.append(code.strip())
    return lines


def commands_of(line: str) -> list[str]:
    return [part.strip() for part in split_outside_quotes(line, "&&") if part.strip()]


def script_of(tokens: list[str]) -> str | None:
    """The repository script a command starts (`examples/x.py`, `benchmarks/y.py`), whatever its launcher."""
    if (
        not tokens
        or tokens[0] not in ("python", "python3", "accelerate", "torchrun")
        or tokens[1:2] in (["-m"], ["-c"])
    ):
        return None
    return next((t for t in tokens if t.endswith(".py") and not t.startswith("-")), None)


def not_run_rule(tokens: list[str]) -> tuple[str, NotRun] | None:
    for prefix, rule in NOT_RUN.items():
        if tokens[: len(prefix.split())] == prefix.split():
            return prefix, rule
    return None


def as_run(block_text: str, scripts_run: set[str] | None = None) -> tuple[str, list[str]]:
    """A bash block as the docs test runs it (tiny flags appended, left-out commands replaced by `true`), and the
    commands it left out, with why. A script in `scripts_run` (run already in this session) is left out, and the
    scripts this block runs are added to it."""
    scripts_run = set() if scripts_run is None else scripts_run
    lines, left_out = [], []
    for line in shell_lines(block_text):
        commands = []
        for command in commands_of(line):
            tokens = shlex.split(command)
            rule = not_run_rule(tokens)
            if rule is not None:
                left_out.append(f"{command}: {rule[1].reason}")
                commands.append("true")
            elif script_of(tokens) in scripts_run:
                left_out.append(f"{command}: {script_of(tokens)} ran already; its arguments are parsed")
                commands.append("true")
            elif script_of(tokens) in TINY_FLAGS:
                scripts_run.add(script_of(tokens))
                tiny = TINY_FLAGS[script_of(tokens)]
                where = ("--output_dir", tiny.output_dir) if tiny.output_dir and "--output_dir" not in tokens else ()
                commands.append(shlex.join([*tokens, *shlex.split(tiny.flags), *where]))
            elif (script_of(tokens) or "").startswith(("examples/", "benchmarks/")):
                raise ValueError(
                    f"`{command}`: {script_of(tokens)} has no tiny flags: add a row to TINY_FLAGS (or NOT_RUN)"
                )
            else:
                commands.append(command)
        lines.append(" && ".join(commands))
    return "\n".join(lines) + "\n", left_out


# ---------------------------------------------------------------------------------------------------------------------
# Parsing a command's arguments with its script's own parser, without running it


class ArgumentsParsed(Exception):
    """Raised by the parsers once a command's arguments are parsed: the check stops there, before anything runs."""


@contextlib.contextmanager
def stop_after_parsing():
    """Every argument parser raises `ArgumentsParsed` once it has parsed (and, for transformers' dataclasses, checked)
    the arguments. The commands are written for machines with GPUs: `--bf16` is taken as available."""
    from transformers import HfArgumentParser
    from transformers import training_args as arguments_module

    originals = {(arguments_module, "is_torch_bf16_gpu_available"): arguments_module.is_torch_bf16_gpu_available}
    arguments_module.is_torch_bf16_gpu_available = lambda *args, **kwargs: True

    def stopping(owner, name):
        original = getattr(owner, name)
        originals[owner, name] = original

        def parse(self, *args, **kwargs):
            original(self, *args, **kwargs)
            raise ArgumentsParsed

        setattr(owner, name, parse)

    stopping(argparse.ArgumentParser, "parse_args")
    for name in ("parse_args_into_dataclasses", "parse_dict", "parse_json_file", "parse_yaml_file"):
        stopping(HfArgumentParser, name)
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|^\[")


def launcher_parser(tokens: list[str]):
    if tokens[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        return launch_command_parser(), tokens[2:]
    if tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser(), tokens[1:]
    return None, tokens[1:]


def argument_error(command: str) -> str | None:
    """Why `command` (a line of a shell session) would be refused by its script's or launcher's parser, or None. Only
    commands that start a repository script or `hf-dbp` are checked."""
    tokens = shlex.split(command)
    if not tokens or any(PLACEHOLDER.search(t) for t in tokens):
        return None
    if tokens[0] == "hf-dbp":
        if len(tokens) < 3:  # `hf-dbp merge`: a name, not a command
            return None
        target, arguments, launcher = "hf_dbp.cli", tokens[1:], None
    else:
        script = script_of(tokens)
        if script is None or not (ROOT / script).is_file():
            return f"{script} is no file of the repository" if script else None
        position = tokens.index(script)
        launcher, launcher_arguments = launcher_parser(tokens[:position])
        target, arguments = script, tokens[position + 1 :]
    messages = io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(messages), contextlib.redirect_stdout(io.StringIO()):
            os.chdir(ROOT)
            if launcher is not None:
                try:
                    launcher.parse_args([*launcher_arguments, target])
                except ArgumentsParsed:
                    pass
            sys.argv = [target, *arguments]
            if target == "hf_dbp.cli":
                runpy.run_module(target, run_name="__main__")
            else:
                sys.path.insert(0, str((ROOT / target).parent))
                runpy.run_path(str(ROOT / target), run_name="__main__")
    except ArgumentsParsed:
        return None
    except SystemExit as stop:
        return f"exit {stop.code}: {messages.getvalue().strip()[-2000:]}"
    except Exception as error:  # noqa: BLE001 - what the parser raised is the message
        return f"{type(error).__name__}: {error}"
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
    return "the script ran past its arguments without parsing them with argparse or HfArgumentParser"


def documented_commands(page: str) -> list[tuple[str, str]]:
    """(where, command) of every command of a page: inline code, and the lines of text and bash blocks."""
    blocks, prose = read_page(page)
    found = [(f"{page} (inline code)", code) for code in inline_code(prose)]
    for block in blocks:
        if block.language in ("bash", "sh", "shell", "text", "console"):
            for line in shell_lines(block.text):
                found += [(f"{page}:{block.line} ({block.language})", c) for c in commands_of(line)]
    return [(where, c) for where, c in found if re.match(r"(python3? |accelerate launch |torchrun |hf-dbp )", c)]


# ---------------------------------------------------------------------------------------------------------------------
# Links


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # GitHub: every character but letters, digits, _, - and spaces goes
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = read_page(path.name, path.parent)
    seen, slugs = {}, set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(page: str, root: Path = ROOT) -> list[str]:
    _, prose = read_page(page, root)
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)
    problems = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (root / page).parent / path if path else root / page
        if not resolved.exists():
            problems.append(f"{target}: no such file or folder")
            continue
        if anchor:
            if resolved.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(resolved.resolve()):
                problems.append(f"{target}: no heading of {resolved.name} has the anchor #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# The tests

RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    # Compiled under the page's name, padded to its line: a traceback points at the page's own line.
    exec(compile("\\n" * (block["line"] - 1) + block["text"], block["page"], "exec"), namespace)
"""


def environment(tmp_path: Path, python_path: Path) -> dict[str, str]:
    env = offline_env(tmp_path / "hf_home")
    env["PYTHONPATH"] = os.pathsep.join([str(python_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The commands of bash blocks (accelerate, ruff, lint-imports) are those of this interpreter's environment.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    return env


def start_python_blocks(page: str, tmp_path: Path, root: Path = ROOT) -> subprocess.Popen:
    """The python blocks of `page`, started in one fresh interpreter in a copy of the page's folder."""
    blocks = [b for b in read_page(page, root)[0] if b.language == "python"]
    folder = tmp_path / "page"
    folder.mkdir(parents=True)
    for item in (root / page).parent.iterdir():  # the page's folder, its files
        if item.is_file() and not item.name.startswith("."):
            shutil.copy(item, folder / item.name)
    (tmp_path / "blocks.json").write_text(json.dumps([b.__dict__ for b in blocks]))
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")],
        cwd=folder,
        env=environment(tmp_path, ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_python_blocks(page: str, tmp_path: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    return finished(start_python_blocks(page, tmp_path, root))


PYTHON_PAGES = [p for p in PAGES if any(b.language == "python" for b in read_page(p)[0])]


@pytest.fixture(scope="session")
def python_block_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every page's python blocks, run two pages at a time (one per core of the CI machines): a page spends most of
    its seconds importing, in a process of its own."""
    results, running = {}, []
    for page in PYTHON_PAGES:
        running.append((page, start_python_blocks(page, tmp_path_factory.mktemp("page"))))
        if len(running) == 2:
            page_done, process = running.pop(0)
            results[page_done] = finished(process)
    for page_done, process in running:
        results[page_done] = finished(process)
    return results


def test_the_pages_are_found():
    assert {"README.md", "CONTRIBUTING.md", "examples/README.md", "benchmarks/README.md"} <= set(PAGES), PAGES
    assert any(p.startswith("docs/") for p in PAGES)


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, python_block_results):
    result = python_block_results[page]
    assert result.returncode == 0, f"{page}'s python blocks failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_a_failing_python_block_is_named_by_its_page_and_line(tmp_path):
    """The blocks of a page share one interpreter (the second sees the first's names), and a failure's traceback
    points at the page's own line."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n\n```python\nx = 1\n```\n\nText.\n\n```python\nassert x == 1\nassert x == 2, 'the claim'\n```\n"
    )
    result = run_python_blocks("docs/page.md", tmp_path / "run", root=tmp_path)
    assert result.returncode != 0
    assert 'File "docs/page.md", line 11' in result.stderr and "the claim" in result.stderr, result.stderr


@pytest.fixture(scope="session")
def repository_copy(tmp_path_factory) -> Path:
    """The repository's files (no .git, no outputs, no caches), where the bash blocks run."""
    copy = tmp_path_factory.mktemp("docs") / "repository"
    ignored = shutil.ignore_patterns(
        ".git",
        "outputs",
        ".venv*",
        "venv",
        "__pycache__",
        "*.egg-info",
        ".pytest_cache",
        ".ruff_cache",
        "build",
        "dist",
    )
    shutil.copytree(ROOT, copy, ignore=ignored)
    return copy


_ran: dict[str, str] = {}
"""What each bash script (as run) gave, so that a block that two pages show runs once per session."""
_scripts_run: set[str] = set()
"""The example scripts run so far in this session: each runs once, at its first bash command in the order of the
pages (README.md first); a later command of the same script is parsed (`test_documented_commands_parse`), not run."""


def _page_order(page: str) -> tuple[bool, str]:
    return page != "README.md", page


@pytest.mark.parametrize(
    "page", sorted((p for p in PAGES if any(b.language == "bash" for b in read_page(p)[0])), key=_page_order)
)
def test_bash_blocks_run(page, repository_copy, tmp_path):
    for block in [b for b in read_page(page)[0] if b.language == "bash"]:
        script, _ = as_run(block.text, _scripts_run)
        if script not in _ran:
            result = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                cwd=repository_copy,
                env=environment(tmp_path, repository_copy),
                capture_output=True,
                text=True,
                timeout=600,
            )
            _ran[script] = (
                ""
                if result.returncode == 0
                else f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
            )
        assert not _ran[script], f"{page}:{block.line}: the bash block, run as\n{script}\nfailed: {_ran[script]}"


@pytest.mark.parametrize("page", PAGES)
def test_documented_commands_parse(page):
    errors = [
        f"{where}: `{command}`: {error}"
        for where, command in documented_commands(page)
        if (error := argument_error(command)) is not None
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    problems = broken_links(page)
    assert not problems, f"{page}:\n" + "\n".join(problems)


def test_the_commands_left_out_are_those_ci_runs():
    """A command left out as CI's (the installs, the suite) is one that .ci/run runs, so what the README says to type
    is what CI checks."""
    ci = [shlex.split(c) for line in shell_lines((ROOT / ".ci" / "run").read_text()) for c in commands_of(line)]
    ci = [[t for t in tokens if t != "--quiet"] for tokens in ci]
    left_out = []
    for page in PAGES:
        for block in read_page(page)[0]:
            if block.language == "bash":
                for line in shell_lines(block.text):
                    for command in commands_of(line):
                        rule = not_run_rule(shlex.split(command))
                        if rule is not None and rule[1].in_ci:
                            left_out.append(command)
    assert left_out, "the README's set-up commands were not found"
    missing = [c for c in left_out if shlex.split(c) not in ci]
    assert not missing, f"left out as CI's, but not in .ci/run: {missing}"


# The checks check: each must be able to fail.


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# hf-dbp: DBP\n\n## Set-up\n\n## Set-up\n")
    (tmp_path / "docs" / "page.md").write_text(
        "# A heading: `code` and more\n\n[ok](#a-heading-code-and-more) [bad](#no-such) [gone](no_such_file.md) "
        "[top](../README.md#hf-dbp) [second](../README.md#set-up-1) `[not a link](#in-code)`\n"
    )
    problems = broken_links("docs/page.md", tmp_path)
    assert [p.split(":")[0] for p in problems] == ["#no-such", "no_such_file.md", "../README.md#hf-dbp"], problems


def test_a_bad_flag_is_refused_and_tiny_flags_are_appended():
    assert argument_error("python examples/compare_bp_dbp.py --no_such_flag 1") is not None
    assert argument_error("accelerate launch --no_such_launcher_flag examples/run_mae_dbp.py") is not None
    assert argument_error("python examples/compare_bp_dbp.py --seeds 0 1") is None
    script, left_out = as_run("pip install x && accelerate launch examples/run_mae_dbp.py  # the demo\n")
    assert script.startswith("true && accelerate launch examples/run_mae_dbp.py --config_overrides") and left_out


def test_github_slugs():
    assert github_slug("Any transformers model: text, speech, vision") == "any-transformers-model-text-speech-vision"
    assert github_slug("`hf-dbp merge` and the Hub") == "hf-dbp-merge-and-the-hub"
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
