# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then the suite).
# torch is installed first, on its own: on the CPU development and CI hosts `torch==2.13.0` is a CPU wheel on local
# disk; letting another package pull torch would download a multi-GB CUDA build. On a GPU machine
# the same pin installs PyTorch's CUDA build; keep an existing torch with
# `make VENV_FLAGS=--system-site-packages` or pick another with `make TORCH_SPEC='torch==2.11.*'`.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The 5-second budget guard run by `make test` (`make test E2E_GUARD=0` leaves it out): the
# end-to-end probe on the CPU with tiny weights through nginx-rtmp on loopback, 40 s of markers.
# On 2 CPU cores the tiny models need a fixed playout delay of 3 s and one whisper canvas per
# second; the guard's second verdict puts the recorded GPU figures in place of that delay.
E2E_GUARD ?= 1
E2E_GUARD_ARGS ?= --weights tiny --device cpu --dtype fp32 --stream-hop 25 --delay-ms 3000 \
	--duration-s 40 --window-s 20

.PHONY: setup test demo lint clean e2e-guard trt

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# the trt engine's optional dependency, in the release made for the installed torch (each
# torch-tensorrt release requires one torch minor version: an unpinned one would replace torch);
# it needs a CUDA build of torch and NVIDIA's TensorRT wheels
trt: setup
	$(PY) -m pip install "$$($(PY) -c 'from musetalk_rt.extras import trt_install_spec; print(trt_install_spec())')"

lint: setup
	$(VENV)/bin/ruff check musetalk_rt tests notebooks
	$(VENV)/bin/ruff format --check musetalk_rt tests notebooks

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)
ifeq ($(E2E_GUARD),1)
	$(MAKE) e2e-guard
endif

e2e-guard: setup
	$(PY) -m musetalk_rt bench e2e --guard $(E2E_GUARD_ARGS) --out out/e2e-guard

demo: setup
	$(PY) -m musetalk_rt.demo

clean:
	rm -rf out .pytest_cache .ruff_cache
