"""The README's example attack and defense work as printed: registered, checked, run in a grid."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import sample
from gridrun import one_thread
from test_defense_conformance import (
    check_bad_parameters,
    check_frozen_model_untouched,
    check_predict_logits,
    check_state_round_trip,
    untrained_model,
)

from bench.core.data import DataPaths, DataSplit
from bench.core.device import to_float
from bench.core.errors import BenchError
from bench.core.registry import ATTACKS, DEFENSES
from bench.orchestration.config import GridConfig
from bench.orchestration.execute import run_grid

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The Python blocks of the README section on adding an attack or a defense."""
    text = README.read_text()
    section = text.split("## Adding an attack or a defense", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def examples() -> Iterator[None]:
    """Each block loaded as its own module (as its own file would be), then unregistered."""
    blocks = readme_examples()
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        module = types.ModuleType(f"readme_example_{i}")
        sys.modules[module.__name__] = module
        exec(compile(code, f"README.md example {i}", "exec"), module.__dict__)
    yield
    ATTACKS.unregister("brighten")
    DEFENSES.unregister("blur")
    for i in range(len(blocks)):
        sys.modules.pop(f"readme_example_{i}", None)


def test_the_examples_register_and_validate(examples) -> None:
    attack = ATTACKS.create("brighten", {"strength": 0.5})
    x = torch.full((2, 1, 4, 4), 0.6)
    assert torch.equal(attack.apply(x), torch.ones_like(x))
    with pytest.raises(BenchError, match=r"^brighten: strength must be in \(0, 1\], got 2$"):
        ATTACKS.create("brighten", {"strength": 2})
    with pytest.raises(BenchError, match=r"^blur: k must be odd, got 4$"):
        DEFENSES.create("blur", {"k": 4})
    check_bad_parameters("blur")


def test_the_example_defense_passes_the_conformance_checks(examples, mnist) -> None:
    data = DataSplit(mnist.name, sample(mnist.train, 64), sample(mnist.test, 8))
    x = to_float(data.test.x)
    defense = check_frozen_model_untouched("blur", {"k": 3}, untrained_model(data), data.train, x)
    check_predict_logits(defense, x, 10)
    check_state_round_trip("blur", {"k": 5}, untrained_model(data), data.train, x)


def test_the_examples_run_in_a_grid(examples, tmp_path) -> None:
    config = GridConfig.model_validate({
        "datasets": [{"name": "mnist5k", "train_subset": 1000, "test_subset": 200}],
        "models": [{"name": "small_cnn", "width": 4}],
        "attacks": [{"name": "brighten", "strength": 0.3}],
        "defenses": ["none", {"name": "blur", "k": [1, 3]}],
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "milestones": [], "flip": False},
    })  # fmt: skip
    with one_thread():
        # in this process: the examples are registered here only
        cells, computed, table = run_grid(config, tmp_path / "run", DataPaths(tmp_path / "d", tmp_path / "c"), "cpu",
                                          workers=1)  # fmt: skip
    assert computed == 3 and [c.defense_label for c in cells] == ["none", "blur(k=1)", "blur(k=3)"]
    assert "brighten(strength=0.3)" in table and "blur(k=3)" in table
    too_wide = GridConfig.model_validate({**config.model_dump(), "defenses": [{"name": "blur", "k": 29}]})
    with pytest.raises(BenchError, match=r"^blur: k 29 is larger than the 28x28 images$"):
        run_grid(too_wide, tmp_path / "run2", DataPaths(tmp_path / "d", tmp_path / "c"), "cpu", workers=1)
