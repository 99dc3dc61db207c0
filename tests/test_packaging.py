"""Packaging stays consistent: environment.yml, pyproject, Makefile, README, CLI entry point."""

import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


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
