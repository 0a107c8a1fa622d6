# GPU pinning of one task, run as `bash -c "$pin" hvdtrain-pin K COMMAND [ARGS...]` by run.sh (and usable as
# `bash pin.sh K COMMAND...`): pin K GPUs by local rank (rank r of a node gets the r-th group of K), then
# exec the command. Indices refer to the GPUs the job was given (CUDA_VISIBLE_DEVICES) when Slurm set it,
# else to 0..n-1; K = 0 leaves CUDA_VISIBLE_DEVICES as it is.
# The renderer shell-quotes the one line of code below into the job script (comments are left out).
k=$1; shift; if [ "$k" -gt 0 ]; then lr=${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}; IFS=, read -ra all <<<"${CUDA_VISIBLE_DEVICES:-}"; [ ${#all[@]} -gt 0 ] || all=($(seq 0 $(((lr + 1) * k - 1)))); CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${all[*]:$((lr * k)):$k}"); export CUDA_VISIBLE_DEVICES; fi; exec "$@"
