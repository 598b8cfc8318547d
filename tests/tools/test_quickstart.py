"""The README's quick start, the Makefile behind it and CI's entry point agree with each other."""

import os
import re
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]


def _section(markdown: str, heading: str) -> str:
    match = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def _make_recipes() -> dict[str, list[str]]:
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if re.match(r"^[a-z]+:", line):
            target = line.split(":")[0]
            recipes[target] = [line]
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
    return recipes


def test_quick_start_is_exactly_make_demo_and_make_test():
    quick_start = _section((ROOT / "README.md").read_text(), "Quick start")
    blocks = re.findall(r"```\n(.*?)```", quick_start, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_demo_and_test_install_first_and_install_pins_the_local_torch():
    recipes = _make_recipes()
    assert recipes["demo"][0] == "demo: install" and recipes["test"][0] == "test: install"
    assert "$(PYTHON) -m hant.tools demo" in recipes["demo"]
    assert "$(PYTHON) -m pytest -q" in recipes["test"]
    install = recipes["install"]
    assert "$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1" in install
    assert '$(PYTHON) -m pip install -e ".[test]"' in install
    assert torch.__version__.split("+")[0] == "2.14.1" and torchvision.__version__.split("+")[0] == "0.29.1"


def test_ci_runs_the_readme_test_command():
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK)
    lines = [line.strip() for line in run.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in lines and lines[-1] == "make test"

