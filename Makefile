# Two commands do everything on a fresh machine:
#   make demo   set-up + the whole pipeline on the embedded synthetic dataset (local Ray, CPU)
#   make test   set-up + lint + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo lint format bench clean

setup:
	bash scripts/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check exits jobs tests bench
	$(VENV)/bin/ruff format --check exits jobs tests bench

format: setup
	$(VENV)/bin/ruff format exits jobs tests bench
	$(VENV)/bin/ruff check --fix exits jobs tests bench

test: setup lint
	$(PY) -m pytest tests -q --durations=15

demo: setup
	$(PY) jobs/pipeline.py --dataset demo_pretrained --output runs/demo
	@echo "report: $(CURDIR)/runs/demo/report/index.html  (metrics: runs/demo/metrics.json)"

clean:
	rm -rf runs demo_data .pytest_cache
