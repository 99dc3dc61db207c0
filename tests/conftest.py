"""Shared pytest helpers.

Real media fixtures live outside the repository at ``../shared/fixtures/`` (relative to the
project root); tests that need them skip with a clear reason when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES_MISSING_REASON = (
    "real media fixtures not found at ../shared/fixtures/ next to the project root "
    "(only developer and CI checkouts have them)"
)


def load_experiment(name: str):
    """The module of ``experiments/<name>.py`` (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fixtures_dir() -> Path:
    """The shared fixtures folder (it may not exist)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    """Path of ``../shared/fixtures``; skips the test when it is absent."""
    path = fixtures_dir()
    if not path.is_dir():
        pytest.skip(FIXTURES_MISSING_REASON)
    return path


@pytest.fixture
def fixture_file(fixtures: Path):
    """Return a function giving the path of one fixture file, skipping if it is missing."""

    def get(name: str) -> Path:
        path = fixtures / name
        if not path.is_file():
            pytest.skip(f"fixture {name} not found in {fixtures}")
        return path

    return get


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny random models on the CPU (shared by the session; never modified)."""
    from musetalk_rt.weights import load_models

    return load_models("tiny", device="cpu")


@pytest.fixture(scope="session")
def yongen_avatar(tiny_models, tmp_path_factory):
    """An avatar prepared from the real talking-avatar fixture with the tiny VAE."""
    src = fixtures_dir() / "yongen.mp4"
    if not src.is_file():
        pytest.skip(FIXTURES_MISSING_REASON)
    from musetalk_rt.avatar import parse_bbox, prepare_avatar

    avatars = tmp_path_factory.mktemp("avatars")
    prepare_avatar(
        src, "yongen", tiny_models, avatars, bbox=parse_bbox("250,300,470,560"), log=lambda _: None
    )
    return avatars
