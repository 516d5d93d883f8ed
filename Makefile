# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
DEMO_RUN ?= outputs/demo
NUM_PROCS ?= 2

.PHONY: setup demo demo-data test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo-data: setup
	@if [ -f $(DEMO_DATA)/manifest.json ]; then echo "using $(DEMO_DATA) (delete it to rebuild)"; else \
	  $(PY) -m data_prep.prepare --source python-stdlib --out_dir $(DEMO_DATA) --vocab_size 4000; fi

demo: demo-data
	rm -rf $(DEMO_RUN)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus $(NUM_PROCS) launch/train.py \
	  --deepspeed_config ds_configs/cpu.json --config launch/presets/demo.yaml \
	  --data.data_dir $(DEMO_DATA) --train.out_dir $(DEMO_RUN)

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) data/demo outputs
