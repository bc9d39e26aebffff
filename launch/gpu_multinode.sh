#!/usr/bin/env bash
#SBATCH --job-name=osp_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300      # SIGTERM to the trainers 5 minutes before the time limit: they save and exit
# Multi-node GPU training with SLURM: `srun python -m osp_jax.train ...`, one process per node (it
# drives all the node's GPUs) or, with --per-gpu, one per GPU. The coordinator settings are exported
# explicitly (OSP_*), although jax would also auto-detect SLURM, so that a run's set-up is visible.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: sbatch [--nodes=N] launch/gpu_multinode.sh [options] -- TRAIN_ARGS...
       bash launch/gpu_multinode.sh [options] -- TRAIN_ARGS...   (inside an salloc allocation)

Runs `srun python -m osp_jax.train TRAIN_ARGS...` across the allocation's nodes.

Options:
  --per-gpu             one process per GPU (CUDA_VISIBLE_DEVICES from SLURM_LOCALID)
                        instead of one process per node
  --gpus-per-node N     GPUs on each node (default: $SLURM_GPUS_ON_NODE, else 8)
  --port PORT           coordinator port on the first node (default: $OSP_COORDINATOR_PORT, else 12355)
  --python PY           interpreter on the nodes (default: $OSP_PYTHON, else python);
                        activate the venv before sbatch, srun passes the environment on
  --dry-run             print the environment and the srun command, run nothing; works without
                        SLURM (fakes SLURM_JOB_NODELIST=node1,node2 and SLURM_NNODES=2 if unset)
  -h, --help            show this help

Example (4 nodes x 8 H100):
  sbatch --nodes=4 launch/gpu_multinode.sh -- \
    --config=configs/osp_1b4.py --workdir=/shared/runs/osp_1b4 --config.mesh.dp=4 --config.mesh.op=8
EOF
}

die() { # usage error: message naming the option, then the usage text, exit 2
  echo "gpu_multinode.sh: error: $*" >&2
  usage >&2
  exit 2
}

per_gpu=0 dry_run=0
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
port=${OSP_COORDINATOR_PORT:-12355}
python=${OSP_PYTHON:-python}
train_args=()

takes_value() { # the option's value: from "--opt=V", or the next word (then shift one more)
  if ((has_val)); then return 0; fi
  (($# >= 2)) || die "$opt needs a value"
  val=$2
  shift_extra=1
}

while (($#)); do
  opt=$1 shift_extra=0
  case $opt in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1 ;;
    *) val=""; has_val=0 ;;
  esac
  case $opt in
    -h|--help) usage; exit 0 ;;
    --per-gpu) per_gpu=1 ;;
    --gpus-per-node) takes_value "$@"; gpus_per_node=$val ;;
    --port) takes_value "$@"; port=$val ;;
    --python) takes_value "$@"; python=$val ;;
    --dry-run) dry_run=1 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$opt' (train arguments go after --)" ;;
  esac
  shift $((1 + shift_extra))
done

[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node expects a positive integer, got '$gpus_per_node'"
[[ $port =~ ^[1-9][0-9]*$ ]] || die "--port expects a port number, got '$port'"

if ((dry_run)); then
  : "${SLURM_JOB_NODELIST:=node1,node2}" "${SLURM_NNODES:=2}"
fi
nodelist=${SLURM_JOB_NODELIST:-}
nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
[[ -n $nodelist && -n $nnodes ]] ||
  die "SLURM_JOB_NODELIST/SLURM_NNODES are unset: submit with sbatch, run inside salloc, or use --dry-run"

# First host of a SLURM node list ("gpu[003-010,012],big1" -> gpu003); scontrol knows every syntax,
# the fallback covers plain "a,b" lists and one bracket range, for machines without SLURM.
first_host() {
  local list=$1 re='^([^,[]+)\[([0-9]+)' hosts
  if command -v scontrol >/dev/null 2>&1; then
    hosts=$(scontrol show hostnames "$list") # all of it: `| head -1` can SIGPIPE it under pipefail
    echo "${hosts%%$'\n'*}"
  elif [[ $list =~ $re ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "${list%%,*}"
  fi
}

coordinator=$(first_host "$nodelist")
if ((per_gpu)); then
  tasks_per_node=$gpus_per_node
else
  tasks_per_node=1
fi
export OSP_COORDINATOR_ADDRESS="$coordinator:$port"
export OSP_NUM_PROCESSES=$((nnodes * tasks_per_node))
# Overlap collectives with compute; anything already in XLA_FLAGS is kept (and wins, coming last).
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"

# Each task sets its own rank (and, per GPU, its one visible GPU: the one SLURM bound to the task if
# it bound one, else the LOCALID-th of those it gave the step, else LOCALID itself), then execs the
# trainer with the train args untouched.
# shellcheck disable=SC2016  # expanded by each task's bash, not here
task='export OSP_PROCESS_ID=$SLURM_PROCID'
if ((per_gpu)); then
  # shellcheck disable=SC2016
  task+='; : "${SLURM_LOCALID:?is not set: the task must run under srun}"'
  # shellcheck disable=SC2016
  task+='; IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"; if ((${#gpus[@]} == 1)); then :;'
  # shellcheck disable=SC2016
  task+=' elif ((${#gpus[@]} > SLURM_LOCALID)); then export CUDA_VISIBLE_DEVICES=${gpus[$SLURM_LOCALID]};'
  # shellcheck disable=SC2016
  task+=' elif ((${#gpus[@]} == 0)); then export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID;'
  # shellcheck disable=SC2016
  task+=' else echo "task $SLURM_PROCID: local id $SLURM_LOCALID but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2; exit 2; fi'
fi
task+='; exec "$@"'

srun_cmd=(srun --nodes="$nnodes" --ntasks="$OSP_NUM_PROCESSES" --ntasks-per-node="$tasks_per_node"
  --kill-on-bad-exit=1 bash -c "$task" osp_task "$python" -m osp_jax.train
  "${train_args[@]+"${train_args[@]}"}")

# Quotes one word as a POSIX shell would need it, so printed lines can be pasted.
q() {
  local s=$1 sq="'"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\\$sq$sq}"
  fi
}

for var in OSP_COORDINATOR_ADDRESS OSP_NUM_PROCESSES XLA_FLAGS; do
  echo "+ export $var=$(q "${!var}")"
done
echo "# OSP_PROCESS_ID=\$SLURM_PROCID in each task$( ((per_gpu)) && echo "; CUDA_VISIBLE_DEVICES from \$SLURM_LOCALID")"
line="+"
for w in "${srun_cmd[@]}"; do line+=" $(q "$w")"; done
echo "$line"
if ((dry_run)); then exit 0; fi
exec "${srun_cmd[@]}"
