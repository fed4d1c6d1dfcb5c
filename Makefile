# `make test` is the project's test command (README, CI). Run from the repository root.
SHELL := /bin/bash
.PHONY: test check-clean check-export nbtest pytest test-wheel bench readme

test: check-clean check-export nbtest pytest

# notebooks must carry no outputs or metadata noise
check-clean:
	nbdev-clean
	@git diff --quiet -- nbs || { git --no-pager diff --stat -- nbs; echo "Notebooks are not clean: run nbdev-clean and commit." >&2; exit 1; }

# unimiss/ must be exactly what the notebooks export
check-export:
	nbdev-export
	@git diff --quiet -- unimiss && [ -z "$$(git status --porcelain --untracked-files=all -- unimiss)" ] || { git status --short -- unimiss; echo "unimiss/ is out of sync with nbs/: run nbdev-export and commit." >&2; exit 1; }

nbtest:
	nbdev-test --n-workers 2 --timing

pytest:
	python -m pytest -q tests

# only the installed-wheel check (part of `pytest`): build the wheel, install it into a fresh venv, run an experiment
test-wheel:
	python -m pytest -q -m wheel tests

bench:
	python bench/bench_mit.py

# README.md is generated from nbs/index.ipynb (nbdev-readme needs Quarto, which cannot be installed offline)
readme:
	jupyter nbconvert --to markdown --execute nbs/index.ipynb --output-dir . --output README
