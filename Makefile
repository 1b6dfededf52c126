# make demo: create .venv, install lpjax, train the default recipe (greedy, 4 stages, MNIST-5k).
# make test: create .venv if needed and run the test suite on 2 workers (PYTEST_ARGS= for one).
# make test-slow: the slow tests (multi-process runs, preemption, fresh-venv install, large recipes, multi-GB model states), skipped by make test.
# Pick the interpreter with PYTHON=...; a different Python version rebuilds .venv from scratch.

PYTHON ?= python3
VENV ?= .venv
DEMO_WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2 --dist loadgroup

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: demo test test-slow venv clean

# The demo's pipelined layout puts each stage on its own device; on CPU, simulate 4 of them.
demo: $(STAMP)
	JAX_NUM_CPU_DEVICES=$${JAX_NUM_CPU_DEVICES:-4} $(BIN)/lpjax train --config recipes/mnist_resnet.py --workdir $(DEMO_WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The tests skipped by default: multi-process runs, larger recipes and model states, and a non-editable install into a fresh venv.
test-slow: $(STAMP)
	LPJAX_SLOW_TESTS=1 $(BIN)/python -m pytest -q -p no:xdist tests/test_multihost.py tests/test_multihost_train.py tests/test_multihost_data.py tests/test_multihost_models.py tests/test_preemption.py tests/test_install.py tests/test_real_recipes.py tests/test_state_on_device.py

venv: $(STAMP)

# Reinstalls when setup.py changes; recreates the venv only when it was made by another Python version.
$(STAMP): setup.py
	@if [ ! -x $(BIN)/python ] || [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$(PYTHON_VERSION)" ]; then \
		echo "creating $(VENV) with $(PYTHON) ($(PYTHON_VERSION))"; \
		$(PYTHON) -m venv --clear $(VENV); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) runs
