"""README.md against the code: the layout names every module and folder there is, the config table every key of
`config.defaults()`, each command-line table every flag of its parser, and the test command is `.ci/run`'s.
Nothing listed may be stale either: each check compares two sets."""
import argparse
import ast
import pathlib
import re
import shlex

import pytest

from osp_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = README.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(r"#{1,%d} " % level, lines[i]) and not lines[i - 1].startswith("```")), len(lines))
    return "\n".join(lines[start:end])


def _first_cells(text: str) -> list[str]:
    """The first cell of every body row of the Markdown tables in `text`."""
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return [row.split(" | ")[0].removeprefix("| ") for row in rows]


def _config_keys_in_readme() -> set[str]:
    """`a.b, c` in a cell is a.b and a.c: a name without a section takes the one before it."""
    keys = set()
    for cell in _first_cells(_section("### Config keys")):
        section = None
        for chunk in re.findall(r"`([^`]+)`", cell):
            for name in (n.strip() for n in chunk.split(",")):
                if "." in name:
                    section, _, name = name.partition(".")
                keys.add(f"{section}.{name}")
    return keys


def test_the_config_table_lists_every_key_and_no_other():
    defined = set(config_lib._flatten(config_lib.defaults()))
    listed = _config_keys_in_readme()
    assert not defined - listed, f"config keys missing from README's table: {sorted(defined - listed)}"
    assert not listed - defined, f"README's config table names keys that do not exist: {sorted(listed - defined)}"


def _flags_in_readme(command: str) -> set[str]:
    flags = set()
    for cell in _first_cells(_section(f"### `python -m {command}`")):
        for flag in re.findall(r"`(--[^`=]+)", cell):
            if not flag.startswith("--config."):  # --config.KEY=VALUE: the config table's keys
                flags.add(flag)
    return flags


def _argparse_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _plot_parser(monkeypatch) -> argparse.ArgumentParser:
    """plot.main builds its parser inline: caught as it parses."""
    from osp_jax import plot

    caught = {}

    def catch(self, args=None, namespace=None):
        caught["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        plot.main([])
    return caught["parser"]


def _train_flags() -> set[str]:
    from absl import flags

    import osp_jax.train  # noqa: F401 - defines its flags

    return {f"--{f.name}" for f in flags.FLAGS.flags_by_module_dict()["osp_jax.train"]}


@pytest.mark.parametrize("command", ["osp_jax.train", "osp_jax.evaluate", "osp_jax.data.prepare", "osp_jax.export",
                                     "osp_jax.plot"])
def test_each_command_table_lists_every_flag_and_no_other(command, monkeypatch):
    if command == "osp_jax.train":
        defined = _train_flags()
    elif command == "osp_jax.plot":
        defined = _argparse_flags(_plot_parser(monkeypatch))
    elif command == "osp_jax.data.prepare":
        from osp_jax.data import prepare

        defined = _argparse_flags(prepare.build_parser())
    else:
        module = __import__(command, fromlist=["_parser"])
        defined = _argparse_flags(module._parser())
    listed = _flags_in_readme(command)
    assert defined == listed, (f"{command}: flags missing from README: {sorted(defined - listed)}; "
                               f"listed but not defined: {sorted(listed - defined)}")


def _flags_in_contracts(command: str) -> set[str]:
    text = (ROOT / "docs" / "CONTRACTS.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith(f"| `python -m {command}` |"))
    return {f for f in re.findall(r"`(--[^`=\s(]+)", row.split(" | ")[1]) if not f.startswith("--config.")}


@pytest.mark.parametrize("command", ["osp_jax.train", "osp_jax.evaluate", "osp_jax.data.prepare", "osp_jax.export",
                                     "osp_jax.plot"])
def test_contracts_lists_the_same_flags_as_the_readme(command):
    """Both are checked against the parsers through the README: docs/CONTRACTS.md names them, the README explains them."""
    assert _flags_in_contracts(command) == _flags_in_readme(command)


def test_the_lm_eval_model_args_are_the_backends():
    """Read from the source, so that the check needs no lm-eval: OspJaxLM's keyword arguments before `*`."""
    tree = ast.parse((ROOT / "osp_jax" / "lm_eval_backend.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OspJaxLM")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    defined = {a.arg for a in init.args.args} - {"self"}
    text = _section("### `python -m osp_jax.lm_eval`")
    listed = set(re.findall(r"`(\w+)`", text.split("the keys", 1)[1]))
    assert defined == listed


def test_the_layout_names_every_module_and_folder():
    block = _section("## Layout").split("```")[1]
    listed, folder = set(), None
    for line in block.splitlines():
        m = re.match(r"^( *)([\w.]+/|[\w.]+\.py|\.ci/run)(\s|$)", line)
        if not m or len(m.group(1)) not in (0, 2, 4):  # a description's second line is indented further
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 0:
            listed.add(name)
            top = name
        elif indent == 2:
            listed.add(f"{top}{name}")
            folder = f"{top}{name}"
        else:
            listed.add(f"{folder}{name}")
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "osp_jax").rglob("*.py") if p.name != "__init__.py"}
    package |= {str(p.relative_to(ROOT)) + "/" for p in (ROOT / "osp_jax").rglob("*")
                if p.is_dir() and p.name != "__pycache__"}
    assert not package - listed, f"missing from README's layout: {sorted(package - listed)}"
    stale = [name for name in listed if not (ROOT / name).exists()]
    assert not stale, f"README's layout names what does not exist: {stale}"
    tops = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in ("runs", "data", "hf", "build", "dist", "__pycache__")  # .gitignore's
            and not p.name.startswith("workdir") and not p.name.endswith(".egg-info")}
    assert not tops - listed, f"top-level folders missing from README's layout: {sorted(tops - listed)}"


def test_the_readme_test_command_is_what_ci_runs():
    """.ci/run's install and pytest lines, as the README's opening gives them."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    install = next(line for line in ci if line.startswith("python -m pip install") and " -e " in line)
    pytest_line = next(line for line in ci if "python -m pytest" in line)
    extras = shlex.split(install)[-1]
    opening = README.split("## What OSP is")[0]
    assert f'pip install -e "{extras}"' in opening
    assert pytest_line.strip() in opening
