# The two set-up commands of the README are scripts (a fresh Debian has no
# make); these targets are shortcuts for developers.
PYTHON ?= .venv/bin/python

.PHONY: test demo bench

test:   ## install everything, then lint, types, contracts and every test
	bash scripts/test.sh

demo:   ## install, then `uproxy demo`
	bash scripts/demo.sh

bench:  ## full benchmark run (~20 min); BENCH_ARGS="--quick" for a 3-minute one
	bash scripts/install.sh
	$(PYTHON) -m pip install -q -e ".[bench]"
	./bench/install.sh
	$(PYTHON) bench/run.py $(BENCH_ARGS)
