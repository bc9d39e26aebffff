#!/usr/bin/env bash
# Launch osp_jax training on a Cloud TPU VM slice (e.g. v4-512), or on several slices joined over the
# data-center network (--num-slices): create the slice(s), install the package on every worker, then run
# the same `python -m osp_jax.train ...` on all workers at once. jax.distributed.initialize() inside
# osp_jax.train finds the other TPU hosts by itself (across slices, from the MEGASCALE_* variables).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE [options] -- TRAIN_ARGS...

Creates (or reuses) a Cloud TPU VM slice, installs osp_jax on every worker and runs
`python -m osp_jax.train TRAIN_ARGS...` on all workers, streaming their output here and
appending it to ~/REMOTE_DIR/train.log on each worker. With --num-slices N > 1: N slices
NAME-0 .. NAME-(N-1), made by one queued resource NAME, trained as one multislice job.

Required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-central2-b
  --accelerator-type TYPE   e.g. v4-512, or each slice's with --num-slices (only needed when created)

Options:
  --project P               GCP project (default: gcloud's configured project)
  --version V               TPU software version (default: tpu-ubuntu2204-base)
  --spot                    create a Spot slice
  --num-slices N            N > 1: a multislice job: `gcloud compute tpus queued-resources create NAME
                            --node-count=N --node-prefix=NAME` (waits until ACTIVE), every slice
                            installed, training started on all of them with MEGASCALE_COORDINATOR_ADDRESS
                            (worker 0 of NAME-0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT;
                            set mesh.dcn_dp (and/or mesh.dcn_fsdp) so that they multiply to N (default 1)
  --reuse                   do not create the slice, use the existing one
  --package SPEC            what to install (default: .):
                              a local directory: its files (git-tracked and untracked-but-not-ignored)
                                are tarred, copied to every worker and installed with [EXTRA];
                                training runs from that copy, so relative --config paths work
                              a URL (git+https://..., https://...): installs 'osp_jax[EXTRA] @ SPEC'
                              anything else: passed to pip verbatim (e.g. 'osp_jax[tpu]==0.1.0')
  --extra EXTRA             package extras to install (default: tpu,gcs: gcs for gs:// paths)
  --python-version X.Y      Python for the workers' venv, fetched by uv if absent (default: 3.11;
                            jax needs >= 3.11, tpu-ubuntu2204-base ships 3.10)
  --remote-dir DIR          working directory on each worker, relative to $HOME (default: osp_jax_run)
  --env KEY=VALUE           export on every worker before training (repeatable)
  --skip-install            do not copy or install anything (re-runs on a prepared slice)
  --dry-run                 print each command (prefixed '+ ') and run nothing
  -h, --help                show this help

Example:
  launch/tpu_pod.sh --name osp-1b4 --zone us-central2-b --accelerator-type v4-512 -- \
    --config=configs/osp_1b4.py --workdir=gs://BUCKET/osp_1b4 --config.data.path=gs://BUCKET/data \
    --config.mesh.dp=2 --config.mesh.op=8 --config.mesh.fsdp=16
  launch/tpu_pod.sh --name osp-ms --zone us-east5-a --accelerator-type v5p-16 --num-slices 2 -- \
    --config=configs/osp_1b4.py --workdir=gs://BUCKET/osp_1b4 --config.data.path=gs://BUCKET/data \
    --config.mesh.fsdp=8 --config.mesh.dcn_dp=2
EOF
}

die() { # usage error: message naming the option, then the usage text, exit 2
  echo "tpu_pod.sh: error: $*" >&2
  usage >&2
  exit 2
}

name="" zone="" accelerator_type="" project="" version="tpu-ubuntu2204-base"
package="." extra="tpu,gcs" python_version="3.11" remote_dir="osp_jax_run"
spot=0 reuse=0 dry_run=0 skip_install=0 num_slices=1
envs=() train_args=()

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
    --name) takes_value "$@"; name=$val ;;
    --zone) takes_value "$@"; zone=$val ;;
    --accelerator-type) takes_value "$@"; accelerator_type=$val ;;
    --project) takes_value "$@"; project=$val ;;
    --version) takes_value "$@"; version=$val ;;
    --package) takes_value "$@"; package=$val ;;
    --extra) takes_value "$@"; extra=$val ;;
    --python-version) takes_value "$@"; python_version=$val ;;
    --remote-dir) takes_value "$@"; remote_dir=$val ;;
    --env)
      takes_value "$@"
      [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE with KEY a shell variable name, got '$val'"
      envs+=("$val") ;;
    --num-slices) takes_value "$@"; num_slices=$val ;;
    --spot) spot=1 ;;
    --reuse) reuse=1 ;;
    --skip-install) skip_install=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$opt' (train arguments go after --)" ;;
  esac
  shift $((1 + shift_extra))
done

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
((reuse)) || [[ -n $accelerator_type ]] || die "--accelerator-type is required to create the slice (or pass --reuse)"
[[ $remote_dir != /* ]] || die "--remote-dir must be relative to \$HOME, got '$remote_dir'"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices expects a positive integer, got '$num_slices'"
# Training runs in the staged source, which the next launch replaces (rm -rf): a relative workdir would
# put the checkpoints on each worker's own disk, inside it.
for a in "${train_args[@]+"${train_args[@]}"}"; do
  case $a in
    --workdir=/* | -workdir=/* | --workdir=*://* | -workdir=*://*) ;;  # a gs:// URL, or a mounted path
    --workdir=* | -workdir=*) die "--workdir must be a gs:// URL or an absolute path on storage every worker mounts, got '${a#*=}'" ;;
    --workdir | -workdir) die "write --workdir=PATH (one word) after --" ;;
  esac
done

# Quotes one word for a POSIX shell (the workers' shell, or a paste of a dry-run line): as is when
# safe, else in single quotes. Readable where printf %q would backslash every space.
q() {
  local s=$1 sq="'"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\\$sq$sq}"
  fi
}

# Prints a command as '+ WORD...', each word quoted so the line can be pasted.
show() {
  local line="+" w
  for w in "$@"; do line+=" $(q "$w")"; done
  echo "$line"
}

# Runs a command, or with --dry-run only prints it.
exists() { # exists LABEL DESCRIBE_COMMAND...: 0 if it finds the resource (said, reused); under --dry-run, shown and assumed absent
  local label=$1
  shift
  if ((dry_run)); then
    run "$@"
    echo "# --dry-run: assuming $label does not exist yet"
    return 1
  fi
  "$@" >/dev/null 2>&1 || return 1
  echo "# $label already exists: reusing it"
}

run() {
  show "$@"
  if ((dry_run)); then return 0; fi
  "$@"
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
loc=(--zone="$zone")
[[ -z $project ]] || loc+=(--project="$project")

rdir=$(q "$remote_dir")

# 1. The slice, or the slices: one queued resource makes them all, NAME-0 .. NAME-(N-1).
slices=("$name")
if ((num_slices > 1)); then
  slices=()
  for ((i = 0; i < num_slices; i++)); do slices+=("$name-$i"); done
fi
if ((reuse)); then
  echo "# --reuse: using existing TPU VM(s) ${slices[*]}"
elif ((num_slices > 1)); then
  qr=(gcloud compute tpus queued-resources)
  if ! exists "queued resource $name" "${qr[@]}" describe "$name" "${loc[@]}"; then
    create=("${qr[@]}" create "$name" "${loc[@]}" --node-count="$num_slices" --node-prefix="$name"
            --accelerator-type="$accelerator_type" --runtime-version="$version")
    ((!spot)) || create+=(--spot)
    run "${create[@]}"
  fi
  # A queued resource is granted when capacity frees up: wait for it (Ctrl-C leaves the request queued).
  state_cmd=("${qr[@]}" describe "$name" "${loc[@]}" --format='value(state.state)')
  if ((dry_run)); then
    run "${state_cmd[@]}"
    echo "# --dry-run: assuming $name is ACTIVE"
  else
    while :; do
      state=$("${state_cmd[@]}") || { echo "tpu_pod.sh: error: cannot describe queued resource $name" >&2; exit 1; }
      [[ $state != ACTIVE ]] || break
      case $state in
        FAILED | SUSPENDED | SUSPENDING) echo "tpu_pod.sh: error: queued resource $name is $state" >&2; exit 1 ;;
      esac
      echo "# queued resource $name is ${state:-not visible yet}: waiting"
      sleep 30
    done
  fi
else
  if ! exists "TPU VM $name" "${gcloud_tpu[@]}" describe "$name" "${loc[@]}"; then
    create=("${gcloud_tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$accelerator_type" --version="$version")
    ((!spot)) || create+=(--spot)
    run "${create[@]}"
  fi
fi

ssh_all() { run "${gcloud_tpu[@]}" ssh "$1" "${loc[@]}" --worker=all --command "$2"; }  # SLICE COMMAND

# 2. The package, installed into a uv-made venv (the image's Python is too old for jax).
if ((!skip_install)); then
  if [[ -d $package ]]; then
    if ((dry_run)); then
      tarball="${TMPDIR:-/tmp}/osp_jax_src.XXXXXX/src.tar.gz"
      echo "+ tar -C $(q "$package") -czf $(q "$tarball") \$(git -C $(q "$package") ls-files -co --exclude-standard)"
    else
      files=()
      if git -C "$package" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        while IFS= read -r -d '' f; do # drop files deleted in the working tree
          [[ -e $package/$f ]] && files+=("$f")
        done < <(git -C "$package" ls-files -z -co --exclude-standard)
      else
        files=(.)
      fi
      ((${#files[@]})) || die "--package $package: no files to ship"
      tmp=$(mktemp -d "${TMPDIR:-/tmp}/osp_jax_src.XXXXXX")
      trap 'rm -rf "$tmp"' EXIT
      tarball=$tmp/src.tar.gz
      echo "+ tar -C $(q "$package") -czf $(q "$tarball") <${#files[@]} files>"
      tar -C "$package" --exclude=.git --exclude=__pycache__ -czf "$tarball" "${files[@]}"
    fi
    for slice in "${slices[@]}"; do
      ssh_all "$slice" "mkdir -p $rdir"
      run "${gcloud_tpu[@]}" scp "$tarball" "$slice:$remote_dir/src.tar.gz" "${loc[@]}" --worker=all
    done
    unpack="rm -rf $rdir/src && mkdir -p $rdir/src && tar -xzf $rdir/src.tar.gz -C $rdir/src"
    requirement="./$remote_dir/src[$extra]"
  else
    unpack="mkdir -p $rdir/src"
    if [[ $package == *://* ]]; then
      requirement="osp_jax[$extra] @ $package"
    else
      requirement=$package
    fi
  fi
  for slice in "${slices[@]}"; do
    ssh_all "$slice" "set -e; $unpack; python3 -m pip install --user --quiet --upgrade uv; \
[ -x $rdir/venv/bin/python ] || python3 -m uv venv --python $(q "$python_version") $rdir/venv; \
python3 -m uv pip install --python $rdir/venv/bin/python $(q "$requirement")"
  done
fi

# 3. Training: the same command on every worker; this ssh is the log stream, tee keeps a copy.
# OSP_DISTRIBUTED=1: osp_jax calls jax.distributed.initialize(), which finds the pod through the TPU VM's
# metadata server (no environment variable there tells a pod from a single host).
exports="export OSP_DISTRIBUTED=1; "
for kv in "${envs[@]+"${envs[@]}"}"; do
  exports+="export ${kv%%=*}=$(q "${kv#*=}"); "
done
cmd="../venv/bin/python -m osp_jax.train"
for a in "${train_args[@]+"${train_args[@]}"}"; do
  cmd+=" $(q "$a")"
done
train_on() { # SLICE [EXPORTS]: training on every worker of one slice
  ssh_all "$1" "set -o pipefail; ${exports}${2-}cd $rdir/src && $cmd 2>&1 | tee -a ../train.log"
}
if ((num_slices == 1)); then
  train_on "$name"
  exit
fi

# Several slices: libtpu joins them over DCN, and jax numbers the processes slice by slice, from these
# variables (a queued resource also puts them in the workers' metadata; set here, reused slices work too).
# Worker 0 of the first slice coordinates.
ip_cmd=("${gcloud_tpu[@]}" describe "${slices[0]}" "${loc[@]}" --format='value(networkEndpoints[0].ipAddress)')
show "${ip_cmd[@]}"
if ((dry_run)); then
  coordinator=COORDINATOR_IP
  echo "# --dry-run: COORDINATOR_IP stands for the address that prints"
else
  coordinator=$("${ip_cmd[@]}")
  [[ -n $coordinator ]] || { echo "tpu_pod.sh: error: no IP address for worker 0 of ${slices[0]}" >&2; exit 1; }
fi
megascale() { # SLICE_ID
  echo "export MEGASCALE_COORDINATOR_ADDRESS=$coordinator; export MEGASCALE_NUM_SLICES=$num_slices; \
export MEGASCALE_SLICE_ID=$1; export MEGASCALE_PORT=8080; "
}
if ((dry_run)); then
  for ((i = 0; i < num_slices; i++)); do train_on "${slices[i]}" "$(megascale "$i")"; done
  exit 0
fi
# Slice 0 streams here; the others too, each line prefixed with its slice. The launcher exits with the
# first failure's status once every slice's stream has ended.
pids=()
for ((i = 1; i < num_slices; i++)); do
  train_on "${slices[i]}" "$(megascale "$i")" > >(sed -u "s/^/[${slices[i]}] /") 2>&1 &
  pids+=($!)
done
status=0
train_on "${slices[0]}" "$(megascale 0)" || status=$?
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; ((status)) || status=$rc; }
done
exit "$status"
