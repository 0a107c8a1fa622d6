#!/usr/bin/env bash
# Runs the test tiers: scripts/test.sh [unit|mpi|e2e|slurm|cluster|login ...] (default: all, in that order).
# A tier that collects no tests is a failure (pytest exit 5), and so is any failing rank.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${HVDTRAIN_VENV:-$repo/.venv}/bin/python
# sbin too: the slurm and cluster tiers need slurmctld, sshd, sysctl whatever PATH the caller had.
export PATH=$(dirname "$py"):$PATH:/usr/local/sbin:/usr/sbin:/sbin OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tiers=("$@")
[ ${#tiers[@]} -eq 0 ] && tiers=(unit mpi e2e slurm cluster login)
failed=()
for tier in "${tiers[@]}"; do
  echo "=== tier: $tier"
  case $tier in
    mpi)
      # Tests marked ranks(N) (hvdtrain's pytest plugin): each rank count's tests run as one job, each rank a
      # pytest session; a test with no progress on some rank for --ranks-timeout seconds is ended by the hang
      # watchdog, naming the rank with every rank's stack. The examples' tests of a user's model run here too.
      # `timeout` is the last backstop: the watchdog judges a rank only once it has reported (a rank stuck in its
      # start-up, before its first test, is not).
      timeout -k 10 900 "$py" -m pytest tests/mpi examples/testing -q -p no:cacheprovider --ranks-timeout 300 ;;
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
