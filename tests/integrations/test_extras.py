"""pyproject extras: what each integration and `pbp-fx train` need, without the dev extra."""
import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _extras() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _names(requirements) -> set:
    return {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}


def test_extras_cover_the_integrations_and_train():
    extras = _extras()
    assert {"transformers", "accelerate"} <= _names(extras["hf"])  # Trainer refuses to start without accelerate
    assert "lightning" in _names(extras["lightning"])
    assert {"matplotlib", "tqdm", "mnist1d"} <= _names(extras["train"])
    assert "peft" in _names(extras["peft"])
    assert "pbp-fx[train,hf,lightning,peft]" in extras["dev"]  # make test runs the integration tests
