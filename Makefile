PYTHON ?= /tmp/venv/bin/python

.PHONY: bench
bench:  ## full benchmark run (~20 min); BENCH_ARGS="--quick" for a 3-minute one
	./bench/install.sh
	$(PYTHON) bench/run.py $(BENCH_ARGS)
