"""Packaging stays consistent: environment.yml, pyproject, Makefile, README, CLI entry point."""

import argparse
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")  # a long option in a command line or a help


def test_environment_yml_is_thin_and_consistent():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    major_minor = python.split("=")[1]
    lowest = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, major_minor.split("."))) >= tuple(map(int, lowest.split(".")))
    assert "pip" in deps and "ffmpeg" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[dev]"]
    assert "dev" in pyproject["project"]["optional-dependencies"]


def test_torch_range_admits_gpu_hosts_and_ci():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert torch_dep == "torch>=2.11,<2.15"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"dev", "notebooks", "trt"} <= set(extras)


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_makefile_installs_torch_first_and_ci_calls_make_test():
    mk = (ROOT / "Makefile").read_text()
    assert mk.index("TORCH_SPEC)") < mk.index('-e ".[dev]"')
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _options_of(command: str, capsys) -> set[str]:
    """The option names of a command line as the README writes it (``musetalk-rt avatar
    prepare``); every sub-command word it names must exist."""
    words = command.split()
    if words[0] == "musetalk-rt":
        from musetalk_rt.cli import build_parser

        parser, rest = build_parser(), words[1:]
    elif words[:3] == ["python", "-m", "musetalk_rt.live"]:
        from musetalk_rt.live.app import build_parser as live_parser

        parser, rest = live_parser(), []
    else:  # a module that builds its parser inside main(): read the options off its --help
        module = importlib.import_module(words[2])
        with pytest.raises(SystemExit):
            module.main(["--help"])
        return set(OPTION.findall(capsys.readouterr().out))
    for word in rest:  # walk down the sub-commands the line names (`bench e2e`, `avatar info`)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        choices = (
            subs[0].choices
            if subs
            else next(
                (a.choices for a in parser._actions if not a.option_strings and a.choices), {}
            )
        )
        names = word.split("|")
        assert all(n in choices for n in names), f"README: {command}: no sub-command {word}"
        if subs:
            parser = subs[0].choices[names[0]]
    return {o for a in parser._actions for o in a.option_strings}


def test_readme_command_lines_match_the_help(capsys):
    """Every option the README's command summary shows exists in that command's ``--help``, and
    every engine it names is a registered one; `render` and `engines build` name them all."""
    from musetalk_rt.engines import available_engines

    text = (ROOT / "README.md").read_text().split("\n## Commands\n", 1)[1]
    block = text.split("```", 2)[1]
    entries: list[str] = []
    for line in block.splitlines()[1:]:
        if line.startswith(("musetalk-rt ", "python -m ")):
            entries.append(line)
        elif line.strip() and entries:
            entries[-1] += " " + line.strip()
    assert len(entries) >= 12
    engines = set(available_engines())
    for entry in entries:
        command = re.split(r" \[| --| [A-Z]", entry, maxsplit=1)[0]
        options = _options_of(command, capsys)
        for option in OPTION.findall(entry):
            assert option in options, f"README: {command} {option} not in --help"
        for value in re.findall(r"--engine ([a-z|,]+)", entry):
            named = set(re.split(r"[|,]", value))
            assert named <= engines, f"README: {command} names unknown engines {named - engines}"
            if command in ("musetalk-rt render", "musetalk-rt engines build"):
                assert named >= engines - {"eager"}, f"README: {command} leaves out an engine"
