# --- run (fixed: the same in every hvdtrain job script) -------------------------------------------------
set -uo pipefail
job=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?submit this script with sbatch}}
task=${SLURM_ARRAY_TASK_ID:-}
if [ $# -eq 0 ]; then
  echo "hvdtrain job: no command given; usage: sbatch SCRIPT COMMAND [ARGS...]" >&2
  exit 2
fi
# {job}, {task} and {value} in the arguments become the job id, the array task id and this task's
# entry of HVDTRAIN_SWEEP_VALUES (space-separated, indexed by the task id).
read -ra values <<<"${HVDTRAIN_SWEEP_VALUES:-}"
value=
if [ -n "$task" ] && [ ${#values[@]} -gt 0 ]; then
  if [ "$task" -ge ${#values[@]} ]; then
    echo "hvdtrain job: array task $task has no entry in HVDTRAIN_SWEEP_VALUES (${#values[@]} values)" >&2
    exit 2
  fi
  value=${values[$task]}
fi
cmd=()
for arg in "$@"; do
  arg=${arg//"{job}"/"$job"}
  arg=${arg//"{task}"/"$task"}
  cmd+=("${arg//"{value}"/"$value"}")
done
# Slurm >= 22.05: srun no longer takes the job's --cpus-per-task by itself; pass it on, and give each rank's
# OpenMP that many threads (unless set).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi
log_dir=$HVDTRAIN_RUN_DIR/@@LOGS@@${task:+/@@TASK_LOGS@@}
mkdir -p "$log_dir"
gpus_per_rank=${HVDTRAIN_GPUS_PER_RANK:-$((${SLURM_GPUS_ON_NODE:-0} / ${SLURM_NTASKS_PER_NODE:-1}))}
pin=@@PIN@@
case ${cmd[0]##*/} in
  hvdtrain)
    # `hvdtrain run/train` start the ranks themselves: srun inside the allocation, -np = SLURM_NTASKS,
    # per-rank logs in their own --run-dir/--output-dir, GPUs by local rank.
    step=("${cmd[@]}") ;;
  *)
    case $HVDTRAIN_LAUNCHER in
      # srun's MPI plugin, chosen here on the node from what its srun offers (HVDTRAIN_SRUN_MPI or SLURM_MPI_TYPE
      # when set): pmix for Open MPI, pmi2 for MPICH; pmix when hvdtrain cannot be imported.
      srun) mpi=$(python3 -m hvdtrain.srunmpi 2>&1)
            case $? in 0) ;; 2) echo "$mpi" >&2; exit 2 ;; *) mpi=${HVDTRAIN_SRUN_MPI:-pmix} ;; esac
            step=(srun --mpi="$mpi" --kill-on-bad-exit=1 --open-mode=append --output="${log_dir//%/%%}/@@RANK_LOG@@"
                  bash -c "$pin" hvdtrain-pin "$gpus_per_rank" "${cmd[@]}") ;;
      mpirun) step=(mpirun -np "$SLURM_NTASKS" --bind-to none --map-by slot --output-filename "$log_dir"
                    bash -c "$pin" hvdtrain-pin "$gpus_per_rank" "${cmd[@]}") ;;
      *) echo "hvdtrain job: HVDTRAIN_LAUNCHER must be srun or mpirun, not '$HVDTRAIN_LAUNCHER'" >&2; exit 2 ;;
    esac ;;
esac
echo "hvdtrain job $job${task:+ task $task} on ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}, $(date -u +%FT%TZ)"
echo "hvdtrain job: rank logs in $log_dir; running: ${step[*]@Q}"
# The step runs in the background so that signals sent to this shell (--signal=B:..., scancel --batch) are
# trapped at once and passed on; signals sent to the steps (--signal=USR2@T, scancel -s USR2) reach the
# ranks directly.
"${step[@]}" &
child=$!
for s in USR1 USR2 TERM INT HUP; do
  trap "kill -s $s $child 2>/dev/null" "$s"
done
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done
echo "hvdtrain job: command exited with status $status, $(date -u +%FT%TZ)"
exit "$status"
