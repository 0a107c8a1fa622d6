# The README's two commands are `make demo` and `make test`; both set up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
HVDTRAIN := $(VENV)/bin/hvdtrain

.PHONY: setup setup-slurm demo test test-unit test-mpi test-e2e test-slurm test-cluster bench lint fuzz

setup:
	bash scripts/setup.sh

setup-slurm:
	bash scripts/setup.sh --slurm

# The main job: the CNN on scikit-learn's digits, data parallel on 2 ranks, prints test accuracy.
demo: setup
	$(HVDTRAIN) train -np 2

# Every tier: unit, mpi (pytest under mpirun -np 2), end to end, a real local Slurm, and a simulated cluster
# (hosts in network namespaces with sshd and a multi-node Slurm).
test: setup-slurm
	bash scripts/test.sh

test-unit test-mpi test-e2e test-slurm test-cluster test-login:
	bash scripts/test.sh $(subst test-,,$@)

bench: setup
	$(HVDTRAIN) bench allreduce -np 2 --out runs/bench-allreduce
	$(HVDTRAIN) bench train --max-np 2 --out runs/bench-train

# The error contract searched deeper than the unit tier's seeded 120 examples: FUZZ_EXAMPLES command lines, a new
# random seed each time (tests/unit/test_contract.py); a failure it prints becomes a row of test_bad_input.py.
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	HVDTRAIN_FUZZ_DEEP=1 HVDTRAIN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/unit/test_contract.py -q \
		-p no:cacheprovider --hypothesis-show-statistics

lint:
	$(PY) -m ruff check hvdtrain tests examples
