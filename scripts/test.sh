#!/usr/bin/env bash
# Runs the test tiers: scripts/test.sh [unit|mpi|e2e|slurm|cluster|login ...] (default: all, in that order).
# A tier that collects no tests is a failure (pytest exit 5), and so is any failing rank.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${HVDTRAIN_VENV:-$repo/.venv}/bin/python
# sbin too: the slurm and cluster tiers need slurmctld, sshd, sysctl whatever PATH the caller had.
export PATH=$(dirname "$py"):$PATH:/usr/local/sbin:/usr/sbin:/sbin OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi_pytest() {  # NP LIMIT_S PYTEST_ARGS...
  local np=$1 limit=$2
  shift 2
  timeout -k 10 "$limit" mpirun -np "$np" --oversubscribe --bind-to none \
    "$py" -m mpi4py -m pytest -p no:cacheprovider -q -x "$@"
}
tiers=("$@")
[ ${#tiers[@]} -eq 0 ] && tiers=(unit mpi e2e slurm cluster login)
failed=()
for tier in "${tiers[@]}"; do
  echo "=== tier: $tier"
  case $tier in
    mpi)
      # Every rank runs the same pytest session; `python -m mpi4py` aborts the job on an uncaught
      # exception, pytest-timeout ends a rank stuck in a collective, and `timeout` is the last backstop.
      # Then the sharded optimizer again with world sizes that do not divide its parameter count, and local SGD
      # with a mean of ranks that is not a half, parameter servers with 2 workers or 2 servers, and pipelines of
      # 3 stages, of 2 stages x 2 replicas and of 4 stages. The flat groups run in a session of their own:
      # Horovod's groups (DistributedOptimizer(groups=...), stock or flat) hang when made after the hvd.join()
      # of test_data_parallel's uneven test in the same process (docs/architecture.md, "One grouped allreduce").
      mpi_pytest 2 900 tests/mpi --ignore=tests/mpi/test_flat_groups.py --timeout=300 &&
        mpi_pytest 2 300 tests/mpi/test_flat_groups.py --timeout=120 &&
        mpi_pytest 3 300 tests/mpi/test_flat_groups.py --timeout=120 &&
        mpi_pytest 3 300 tests/mpi/test_zero.py --timeout=120 &&
        mpi_pytest 4 300 tests/mpi/test_zero.py --timeout=120 &&
        mpi_pytest 3 300 tests/mpi/test_local_sgd.py tests/mpi/test_ps.py tests/mpi/test_pipe.py --timeout=120 &&
        mpi_pytest 4 300 tests/mpi/test_pipe.py --timeout=120 ;;
    unit|e2e|slurm|cluster)
      "$py" -m pytest "tests/$tier" -q --timeout=900 ;;
    login)
      # An ordinary account on a simulated login node: each MPI's first test includes a whole set-up as that
      # user (PyPI's CUDA torch, mpi4py and Horovod built against the module's MPI: about 10 minutes on 2 cores).
      "$py" -m pytest tests/login -q -s --timeout=2400 ;;
    *) echo "unknown tier '$tier' (valid: unit mpi e2e slurm cluster login)" >&2; exit 2 ;;
  esac
  rc=$?
  [ $rc -eq 5 ] && echo "tier $tier collected no tests: that is a failure" >&2
  [ $rc -ne 0 ] && failed+=("$tier (exit $rc)")
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED tiers: ${failed[*]}" >&2
  exit 1
fi
echo "all tiers passed: ${tiers[*]}"
