# hant: `make demo` and `make test` are the README's quick start; both install first.
PYTHON ?= python3

.PHONY: install demo test

# All set-up: PyTorch and torchvision pinned (never a newer torch), then hant editable with its test extra.
install:
	$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -e ".[test]"

# The main job end to end: train the digits teacher, make it faster, measure every step (writes hant-demo/).
demo: install
	$(PYTHON) -m hant.tools demo

# The whole test suite.
test: install
	$(PYTHON) -m pytest -q
