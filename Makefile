# The two commands the README opens with. Both set up what they need first.
.PHONY: run test setup setup-run lint unit fmt
# A recipe that fails leaves no half-made target (a .venv without its packages).
.DELETE_ON_ERROR:

# The C sources, formatted by the root .clang-format.
C_SOURCES = bpf/*.c bpf/*.h kmod/*.c kmod/*.h kmod/include/ktel/*.h ktel/probes/*.c

# Everything, the tests' needs included (what CI runs).
setup:
	bash deploy/setup.sh

# Only what running needs: no qemu, clang, kernel image, helm or dev packages.
setup-run:
	bash deploy/setup.sh run

run: setup-run
	.venv/bin/ktel --config deploy/local.toml up

test: setup lint
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy ktel edge_agent processors exporters bench
	clang-format --dry-run --Werror $(C_SOURCES)

# The developer loop: no deploy/setup.sh, no servers, only the unit tests.
unit: .venv/bin/python
	.venv/bin/python -m pytest tests/unit -q

fmt: .venv/bin/python
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
	clang-format -i $(C_SOURCES)

# Only when .venv is missing: the Python packages and the compiled packer (it needs gcc and
# python3-dev; deploy/setup.sh installs those and Debian's BCC, which unit tests do not need).
.venv/bin/python:
	python3.11 -m venv .venv
	.venv/bin/pip install -q -e '.[dev]'
