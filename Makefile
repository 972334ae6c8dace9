# The two commands the README opens with. Both set up what they need first.
.PHONY: run test setup lint

setup:
	bash deploy/setup.sh

run: setup
	.venv/bin/ktel --config deploy/local.toml up

test: setup lint
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy ktel edge_agent processors exporters
