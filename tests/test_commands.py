"""The command line's one face: each flag means one thing everywhere, docs/cli.md is the parsers',
old spellings still work with a notice, and the package keeps commands apart from the library."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

import pytest

import cadsam
from cadsam.commands import build_parser, main
from cadsam.commands.flags import FLAGS
from cadsam.commands.reference import cli_reference, subcommands

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cadsam"


def flag_actions() -> list[tuple[str, str, argparse.Action]]:
    """(command, flag, action) for every visible flag of every command."""
    found = []
    for command, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or "--help" in action.option_strings:
                continue
            found += [(command, flag, action) for flag in action.option_strings]
    return found


def test_each_flag_has_one_meaning_one_default_and_one_help_text():
    seen: dict[str, dict[tuple, list[str]]] = {}
    for command, flag, action in flag_actions():
        meaning = (action.dest, action.help, repr(action.default), action.nargs, action.type)
        seen.setdefault(flag, {}).setdefault(meaning, []).append(command)
    differing = {flag: meanings for flag, meanings in seen.items() if len(meanings) > 1}
    assert not differing, differing


def test_flags_shared_by_two_commands_come_from_the_one_definition():
    commands_of: dict[str, set[str]] = {}
    for command, flag, _ in flag_actions():
        commands_of.setdefault(flag, set()).add(command)
    shared = {flag for flag, commands in commands_of.items() if len(commands) > 1}
    assert shared <= set(FLAGS), sorted(shared - set(FLAGS))
    for command, flag, action in flag_actions():
        if flag in FLAGS:
            assert action.help == FLAGS[flag]["help"], (command, flag)


def test_a_flag_that_takes_several_values_is_plural_and_one_value_singular():
    for command, flag, action in flag_actions():
        if action.nargs in ("+", "*"):
            assert flag.endswith("s"), (command, flag)
            singular = flag[:-1]
            assert singular not in FLAGS or FLAGS[singular].get("nargs") is None, flag


@pytest.mark.parametrize(
    "command, flag",
    [("train", "--images"), ("eval", "--images"), ("predict", "--images"), ("cache", "--images")]
    + [(c, "--out") for c in ("train", "cache", "predict", "export", "bench", "demo", "reproduce")]
    + [
        (c, flag)
        for c in ("train", "eval", "predict", "cache", "bench", "demo", "reproduce")
        for flag in ("--runtime", "--set")
    ],
)
def test_every_command_that_needs_a_flag_takes_it_by_the_same_name(command, flag):
    assert flag in {f for c, f, _ in flag_actions() if c == command}


def test_split_is_only_a_dataset_split():
    for command, flag, action in flag_actions():
        if flag == "--split":
            assert action.help == FLAGS["--split"]["help"], command


def test_docs_cli_md_is_generated_from_the_parsers():
    written = (ROOT / "docs" / "cli.md").read_text()
    assert written == cli_reference(), (
        "docs/cli.md is stale: python -m cadsam.commands.reference > docs/cli.md"
    )


@pytest.mark.parametrize(
    "old, new, command, required",
    [
        (["--input", "x"], "--images", "predict", []),
        (["--output", "x"], "--out", "predict", []),
        (["--compile"], "--set compile_encoder=true", "cache", ["--backbone", "vit_tiny"]),
        (["--split"], "--format encoder-decoder", "export", ["--out", "x.onnx"]),
        (["--methods", "cad"], "--variants", "bench", []),
        (["--precision", "fp32", "bf16"], "--precisions", "bench", []),
    ],
)
def test_old_spellings_work_with_a_one_line_notice(old, new, command, required, capsys):
    parser = subcommands(build_parser())[command]
    args, extras = parser.parse_known_args(required + old)
    notice = capsys.readouterr().err.strip().splitlines()
    assert not extras
    assert len(notice) == 1 and old[0] in notice[0] and new in notice[0], notice
    taken = {
        "--input": ("images", "x"),
        "--output": ("out", "x"),
        "--compile": ("compile", True),
        "--split": ("format", "encoder-decoder"),
        "--methods": ("variants", ["cad"]),
        "--precision": ("precisions", ["fp32", "bf16"]),
    }[old[0]]
    assert getattr(args, taken[0]) == taken[1]


def test_a_bad_choice_is_one_line_with_the_close_match(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--backbone", "vit-b"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1
    assert len(err) == 1 and "vit_b" in err[0] and err[0].startswith("cadsam train: error:")


def _package_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cadsam modules ``name`` imports, at its top level or inside a function: a lazy
    import hides a cycle from the interpreter, not from a reader."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if not base.startswith("cadsam"):
            continue
        for alias in node.names:  # ``from . import hf`` imports the module cadsam.sam.hf
            found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    # a package's __init__ importing its own modules is how packages are built, not a cycle
    return {target for target in found - {name} if not target.startswith(name + ".")}


def test_no_import_cycle_between_modules():
    modules = _package_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def cycle_from(path: list[str]) -> list[str] | None:
        for target in sorted(graph.get(path[-1], ())):
            if target in path:
                return [*path[path.index(target) :], target]
            if target not in done:
                found = cycle_from([*path, target])
                if found:
                    return found
        done.add(path[-1])
        return None

    for name in sorted(graph):
        cycle = None if name in done else cycle_from([name])
        assert cycle is None, " -> ".join(cycle)


def test_the_top_level_holds_library_modules_only():
    commands = {"cli", "demo", "bench", "reproduce", "paper", "figures"}
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert not top & commands, top & commands
    for path in PACKAGE.glob("*.py"):
        assert "argparse" not in path.read_text(), path.name


def test_the_python_api_is_at_the_top_of_the_package():
    for name in ("load", "train", "evaluate", "zero_shot", "build_model", "build_sam", "Runtime"):
        assert callable(getattr(cadsam, name)), name


def test_the_readme_is_read_in_five_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


def test_provenance_is_the_packages_own_checkout_never_the_folder_around_it(tmp_path):
    import subprocess

    from cadsam.provenance import provenance, source_commit

    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=cwd,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    around = tmp_path / "users-project"  # a user's repository, cadsam copied inside it
    installed = around / "vendor" / "cadsam-src"
    installed.mkdir(parents=True)
    (installed / "file.txt").write_text("x")
    git("init", "-q", cwd=around)
    git("add", ".", cwd=around)
    git("commit", "-qm", "user's", cwd=around)
    assert source_commit(installed) is None
    git("init", "-q", cwd=installed)
    git("add", ".", cwd=installed)
    git("commit", "-qm", "own", cwd=installed)
    assert source_commit(installed) == git("rev-parse", "HEAD", cwd=installed)
    (installed / "file.txt").write_text("changed")
    assert source_commit(installed).endswith("+changes")
    assert provenance()["cadsam"] == cadsam.__version__
