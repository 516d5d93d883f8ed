# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
DEMO_RUN ?= outputs/demo
CONTINUAL_RUN ?= outputs/continual-demo
COMPARE_OUT ?= outputs/compare
NUM_PROCS ?= 2
# A free port, so the demo does not collide with another job on this machine (DeepSpeed's default is 29500).
MASTER_PORT ?= $(shell $(PYTHON) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

.PHONY: setup extras demo demo-data continual-demo compare test bench clean

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
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus $(NUM_PROCS) --master_port $(MASTER_PORT) launch/train.py \
	  --deepspeed_config ds_configs/cpu.json --config launch/presets/demo.yaml \
	  --data.data_dir $(DEMO_DATA) --train.out_dir $(DEMO_RUN)

# The demo corpus split into 3 tasks (continual.num_tasks), with replay and EWC: the task x task matrix.
continual-demo: demo-data
	rm -rf $(CONTINUAL_RUN)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus $(NUM_PROCS) --master_port $(MASTER_PORT) launch/train.py \
	  --deepspeed_config ds_configs/cpu.json --config launch/presets/continual_demo.yaml \
	  --data.data_dir $(DEMO_DATA) --train.out_dir $(CONTINUAL_RUN)
	@echo "task x task matrix: $(CONTINUAL_RUN)/task_matrix.json (and .csv); heatmap: $(CONTINUAL_RUN)/task_matrix.png"

# The hybrid against a Transformer of the same non-embedding size on the demo corpus, equal tokens, 2 LRs each.
compare: demo-data
	rm -rf $(COMPARE_OUT)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pipeline.compare --config launch/presets/demo.yaml \
	  --data.data_dir $(DEMO_DATA) --deepspeed_config ds_configs/cpu.json --num_procs $(NUM_PROCS) \
	  --budget tokens:300000 --lrs 2e-3,4e-3 --out $(COMPARE_OUT)

# Optional packages for the export, lm-eval and W&B (requirements-extras.txt); `make demo` does not need them.
extras: $(VENV)/.extras

$(VENV)/.extras: $(VENV)/.installed requirements-extras.txt
	$(PY) -m pip install -q -r requirements-extras.txt
	touch $@

test: setup extras
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) data/demo outputs
