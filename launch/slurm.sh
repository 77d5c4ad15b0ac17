#!/usr/bin/env bash
# Train on several Slurm nodes: one `accelerate launch` per node (through srun), each starting
# one process per GPU of its node.
#
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh ds_configs/zero3.json [train.py flags]
#
# Submit from the repository root (sbatch runs a copy of this file, so the root is the folder
# it was submitted from), with the environment set up there (.venv from launch/setup.sh, or
# ACCELERATE pointing at another `accelerate`). The main process runs on the first host of the
# job, port MAIN_PORT (default 29500). --output-dir must be a folder every node sees (a shared
# file system): the run refuses one that is not. GRAM_SLURM_DRY_RUN=1 prints the commands
# instead of running them (GRAM_HOSTS="h1 h2" stands in for the job's host list).
#SBATCH --job-name=gram-scale
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

node_mode=0
if [[ "${1:-}" == "--node" ]]; then # inside srun: this node's launch
  node_mode=1
  shift
fi
config=${1:?usage: sbatch launch/slurm.sh DEEPSPEED_CONFIG [train.py flags]}
shift
root=${SLURM_SUBMIT_DIR:-$PWD}
cd "$root"
nodes=${SLURM_NNODES:?not inside a Slurm job (SLURM_NNODES unset)}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
gpus=${gpus##*:} # "h100:8" -> 8
hosts=${GRAM_HOSTS:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")}
read -r main _ <<<"$hosts"
port=${MAIN_PORT:-29500}
accelerate_bin=${ACCELERATE:-$root/.venv/bin/accelerate}

node_command() { # the launch of machine rank $1; the rest: train.py's flags
  local rank=$1
  shift
  local cmd=("$accelerate_bin" launch --config_file accelerate_configs/multi_node.yaml
    --num_machines "$nodes" --machine_rank "$rank" --main_process_ip "$main"
    --main_process_port "$port" --num_processes "$((nodes * gpus))"
    launch/train.py --config "$config" "$@")
  if [[ "${GRAM_SLURM_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    exec "${cmd[@]}"
  fi
}

if [[ $node_mode == 1 ]]; then
  node_command "${SLURM_NODEID:?}" "$@"
elif [[ "${GRAM_SLURM_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' srun --nodes "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1 \
    bash "$root/launch/slurm.sh" --node "$config" "$@"
  echo
  for ((rank = 0; rank < nodes; rank++)); do
    node_command "$rank" "$@"
  done
else
  srun --nodes "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1 \
    bash "$root/launch/slurm.sh" --node "$config" "$@"
fi
