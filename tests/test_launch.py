"""Launchers: dry-run output, and real runs against fake gcloud / srun / scontrol / python on PATH.

No gcloud or SLURM is needed: the fakes are small bash scripts, so this runs anywhere bash, tar and
git do.
"""
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
GPU = ROOT / "launch" / "gpu_multinode.sh"

# Awkward on purpose: a space, a single quote, shell metacharacters and an empty argument.
TRAIN_ARGS = ["--config=configs/osp_1b4.py", "--workdir=gs://b/run 1", "--config.name=it's a $HOME `x`", ""]
TPU_REQUIRED = ["--name", "osp-1b4", "--zone", "us-central2-b", "--accelerator-type", "v4-512"]


def clean_env(**extra):
    """The caller's environment minus anything the launchers read (pytest's XLA_FLAGS, SLURM_*)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OSP_", "XLA_", "CUDA_VISIBLE"))}
    env.update(extra)
    return env


def sh(script, *args, env=None, check=True):
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The '+ ' lines of a dry run, each split back into words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def after_train(words):
    """Arguments after `-m osp_jax.train` (up to a shell redirection, if any)."""
    i = words.index("osp_jax.train")
    assert words[i - 1] == "-m"
    rest = words[i + 1:]
    return rest[:rest.index("2>&1")] if "2>&1" in rest else rest


def write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_scripts_are_executable():
    for script in (TPU, GPU):
        assert os.access(script, os.X_OK), script


# --------------------------------------------------------------------------------------- tpu_pod.sh

def test_tpu_dry_run_creates_installs_and_trains():
    out = sh(TPU, *TPU_REQUIRED, "--project", "my-proj", "--spot", "--dry-run", "--", *TRAIN_ARGS).stdout
    cmds = commands(out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(c[1:4] == ["compute", "tpus", "tpu-vm"] for c in gcloud)
    assert all("--zone=us-central2-b" in c and "--project=my-proj" in c for c in gcloud)

    (create,) = [c for c in gcloud if c[4] == "create"]
    assert create[5] == "osp-1b4"
    assert "--accelerator-type=v4-512" in create
    assert "--version=tpu-ubuntu2204-base" in create
    assert "--spot" in create

    ssh = [c for c in gcloud if c[4] == "ssh"]
    scp = [c for c in gcloud if c[4] == "scp"]
    assert ssh and scp and all("--worker=all" in c for c in ssh + scp)
    remote = [c[c.index("--command") + 1] for c in ssh]
    assert any("uv pip install" in r and "[tpu,gcs]" in r for r in remote)

    # Creation, then install, then training, in that order.
    order = [c[4] for c in gcloud]
    assert order.index("create") < order.index("scp") < len(order) - 1 and order[-1] == "ssh"
    train = shlex.split(remote[-1])
    assert after_train(train) == TRAIN_ARGS
    assert "tee" in train
    assert "export OSP_DISTRIBUTED=1;" in remote[-1]  # osp_jax starts jax.distributed: a TPU VM pod has no env to tell


def test_tpu_reuse_skips_creation_and_accelerator_type():
    args = ["--name", "osp-1b4", "--zone", "us-central2-b", "--reuse", "--dry-run", "--", "--config=c.py"]
    cmds = commands(sh(TPU, *args).stdout)
    verbs = [c[4] for c in cmds if c[0] == "gcloud"]
    assert "create" not in verbs and "describe" not in verbs
    assert "ssh" in verbs


def test_tpu_remote_package_and_skip_install():
    url = "git+https://github.com/example/osp_jax@main"
    cmds = commands(sh(TPU, *TPU_REQUIRED, "--package", url, "--extra", "tpu", "--dry-run", "--", "-x").stdout)
    assert not any(c[0] == "tar" or c[4:5] == ["scp"] for c in cmds)
    remote = " ".join(c[c.index("--command") + 1] for c in cmds if "--command" in c)
    assert f"osp_jax[tpu] @ {url}" in remote

    cmds = commands(sh(TPU, *TPU_REQUIRED, "--skip-install", "--dry-run", "--", "-x").stdout)
    ssh = [c for c in cmds if c[0] == "gcloud" and c[4] == "ssh"]
    assert len(ssh) == 1 and after_train(shlex.split(ssh[0][-1])) == ["-x"]


@pytest.mark.parametrize("drop", ["--name", "--zone", "--accelerator-type"])
def test_tpu_missing_required_option_exits_2(drop):
    args = list(TPU_REQUIRED)
    i = args.index(drop)
    del args[i:i + 2]
    proc = sh(TPU, *args, "--dry-run", "--", "-x", check=False)
    assert proc.returncode == 2
    assert drop in proc.stderr and "Usage:" in proc.stderr
    assert "+ " not in proc.stdout


def test_tpu_relative_workdir_is_refused():
    """Training runs in the staged source, which the next launch deletes: a relative workdir would put
    every worker's checkpoints on its own disk, inside it."""
    proc = sh(TPU, *TPU_REQUIRED, "--dry-run", "--", "--workdir=runs/x", check=False)
    assert proc.returncode == 2 and "--workdir must be a gs:// URL or an absolute path" in proc.stderr
    assert "+ " not in proc.stdout
    assert sh(TPU, *TPU_REQUIRED, "--dry-run", "--", "--workdir=/gcs/b/x").returncode == 0
    assert sh(TPU, *TPU_REQUIRED, "--dry-run", "--", "--workdir=gs://b/x").returncode == 0
    proc = sh(TPU, *TPU_REQUIRED, "--dry-run", "--", "-workdir=runs/x", check=False)  # absl's one-dash form
    assert proc.returncode == 2 and "got 'runs/x'" in proc.stderr


def test_tpu_env_name_must_be_a_shell_variable():
    proc = sh(TPU, *TPU_REQUIRED, "--env", "WANDB-KEY=x", "--dry-run", "--", "-x", check=False)
    assert proc.returncode == 2 and "WANDB-KEY=x" in proc.stderr


@pytest.mark.parametrize("env,flags,expect", [
    # the launchers' explicit trio: jax's SLURM detection must not narrow the process to GPU SLURM_LOCALID
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}, ("host:1234", 2, 1),
     {"coordinator_address": "host:1234", "num_processes": 2, "process_id": 1,
      "cluster_detection_method": "deactivate"}),
    ({"OSP_COORDINATOR_ADDRESS": "h:9", "OSP_NUM_PROCESSES": "4", "OSP_PROCESS_ID": "3"}, (None, None, None),
     {"coordinator_address": "h:9", "num_processes": 4, "process_id": 3, "cluster_detection_method": "deactivate"}),
    ({"OSP_DISTRIBUTED": "1"}, (None, None, None), {}),  # tpu_pod.sh: jax finds the pod itself
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, (None, None, None), {}),
    ({}, (None, None, None), None),  # a plain single process: no jax.distributed at all
])
def test_initialize_distributed_arguments(monkeypatch, env, flags, expect):
    from osp_jax import sharding

    for k in ("OSP_COORDINATOR_ADDRESS", "OSP_NUM_PROCESSES", "OSP_PROCESS_ID", "OSP_DISTRIBUTED", "SLURM_JOB_ID",
              "SLURM_NTASKS", "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    sharding.initialize_distributed(*flags)
    assert calls == ([] if expect is None else [expect])


def test_coordinator_without_process_count_exits_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "osp_jax.train", "--config=configs/tiny.py",
                           f"--workdir={tmp_path}", "--coordinator_address=localhost:1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "process count and id" in proc.stderr and "Traceback" not in proc.stderr


def test_tpu_help_and_unknown_option():
    assert "Usage:" in sh(TPU, "-h").stdout
    proc = sh(TPU, *TPU_REQUIRED, "--bogus", check=False)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_tpu_real_run_against_fake_gcloud(tmp_path):
    """Not a dry run: gcloud 'ssh' runs its --command in a fake worker home, 'scp' copies there."""
    home, bin_dir, tmp = tmp_path / "worker", tmp_path / "bin", tmp_path / "tmp"
    for d in (home, bin_dir, tmp):
        d.mkdir()
    log = tmp_path / "gcloud.log"
    write_exe(bin_dir / "gcloud", r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
case $4 in
  describe) exit 1 ;;
  create) exit 0 ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh) prev=""; for a; do [[ $prev == --command ]] && cmd=$a; prev=$a; done
       cd "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "$cmd" ;;
  *) exit 3 ;;
esac
""")
    # The worker's python3: records pip/uv calls; `uv venv DIR` makes DIR/bin/python, which records
    # how training was started.
    write_exe(bin_dir / "python3", r"""#!/usr/bin/env bash
printf 'python3 %s\n' "$*" >> "$FAKE_LOG"
if [[ "$1 $2 $3" == "-m uv venv" ]]; then
  dir=${!#}; mkdir -p "$dir/bin"
  printf '%s\n' '#!/usr/bin/env bash' \
    'printf "%s\0" "$@" > "$FAKE_HOME/argv"; pwd > "$FAKE_HOME/cwd"' \
    'printf "%s" "$RUN_NOTE" > "$FAKE_HOME/note"; echo training-output' > "$dir/bin/python"
  chmod +x "$dir/bin/python"
fi
""")
    # The package to ship: a git repo with a tracked, an untracked and an ignored file.
    pkg = tmp_path / "pkg"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "configs" / "osp_1b4.py").write_text("# config\n")
    (pkg / ".gitignore").write_text("big.bin\n")
    (pkg / "big.bin").write_text("ignored\n")
    (pkg / "new.txt").write_text("untracked\n")
    git = ["git", "-C", str(pkg), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "configs", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)

    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(home),
                    TMPDIR=str(tmp))
    proc = sh(TPU, *TPU_REQUIRED, "--package", str(pkg), "--env", "RUN_NOTE=a b'c",
              "--", *TRAIN_ARGS, env=env)
    assert "training-output" in proc.stdout

    calls = log.read_text()
    assert "tpu-vm describe osp-1b4" in calls and "tpu-vm create osp-1b4" in calls
    assert "--accelerator-type=v4-512" in calls
    assert "-m uv pip install --python osp_jax_run/venv/bin/python ./osp_jax_run/src[tpu,gcs]" in calls

    src = home / "osp_jax_run" / "src"
    assert (src / "configs" / "osp_1b4.py").exists() and (src / "new.txt").exists()
    assert not (src / "big.bin").exists()
    argv = (home / "argv").read_text().split("\0")[:-1]
    assert argv == ["-m", "osp_jax.train", *TRAIN_ARGS]
    assert Path((home / "cwd").read_text().strip()) == src
    assert (home / "note").read_text() == "a b'c"
    assert "training-output" in (home / "osp_jax_run" / "train.log").read_text()
    assert list(tmp.iterdir()) == []  # the local tarball was cleaned up


# --------------------------------------------------------------------------- tpu_pod.sh, several slices
MULTISLICE = ["--name", "osp-ms", "--zone", "us-east5-a", "--accelerator-type", "v5p-16", "--num-slices", "2"]


def test_tpu_multislice_dry_run_makes_one_queued_resource_and_trains_every_slice():
    cmds = commands(sh(TPU, *MULTISLICE, "--spot", "--dry-run", "--", *TRAIN_ARGS).stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    queued = [c for c in gcloud if c[3] == "queued-resources"]
    (create,) = [c for c in queued if c[4] == "create"]
    assert create[5] == "osp-ms" and "--node-count=2" in create and "--node-prefix=osp-ms" in create
    assert "--accelerator-type=v5p-16" in create and "--runtime-version=tpu-ubuntu2204-base" in create
    assert "--spot" in create and "--zone=us-east5-a" in create
    assert any(c[4] == "describe" and "--format=value(state.state)" in c for c in queued)  # waits for ACTIVE
    assert not any(c[4] == "create" for c in gcloud if c[3] == "tpu-vm")

    # Every slice gets the package, then every slice trains, all after the slices exist.
    scp = [c[6].split(":")[0] for c in gcloud if c[4] == "scp"]
    ssh = [(c[5], c[c.index("--command") + 1]) for c in gcloud if c[4] == "ssh"]
    assert scp == ["osp-ms-0", "osp-ms-1"]
    installs = [slice_ for slice_, remote in ssh if "uv pip install" in remote]
    trains = [(slice_, remote) for slice_, remote in ssh if "osp_jax.train" in remote]
    assert installs == ["osp-ms-0", "osp-ms-1"] and [t[0] for t in trains] == ["osp-ms-0", "osp-ms-1"]
    assert gcloud.index(create) < min(i for i, c in enumerate(gcloud) if c[4] == "scp")
    (ip,) = [c for c in gcloud if c[3] == "tpu-vm" and c[4] == "describe"]
    assert ip[5] == "osp-ms-0" and "--format=value(networkEndpoints[0].ipAddress)" in ip
    for slice_id, (_, remote) in enumerate(trains):
        assert after_train(shlex.split(remote)) == TRAIN_ARGS
        exports = dict(e.split("=", 1) for e in re.findall(r"export (\w+=\S+);", remote))
        assert exports == {"OSP_DISTRIBUTED": "1", "MEGASCALE_COORDINATOR_ADDRESS": "COORDINATOR_IP",
                           "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": str(slice_id), "MEGASCALE_PORT": "8080"}


def test_tpu_num_slices_must_be_a_positive_integer():
    for bad in ("0", "two", "-1"):
        proc = sh(TPU, *TPU_REQUIRED, "--num-slices", bad, "--dry-run", "--", "-x", check=False)
        assert proc.returncode == 2 and f"--num-slices expects a positive integer, got '{bad}'" in proc.stderr
        assert "+ " not in proc.stdout
    single = commands(sh(TPU, *TPU_REQUIRED, "--num-slices", "1", "--dry-run", "--", "-x").stdout)
    assert single == commands(sh(TPU, *TPU_REQUIRED, "--dry-run", "--", "-x").stdout)  # one slice: as before


@pytest.mark.parametrize("failing_slice", [None, 1])
def test_tpu_multislice_real_run_against_fake_gcloud(tmp_path, failing_slice):
    """Not a dry run: a fake gcloud grants the queued resource on the second look, gives worker 0 of the
    first slice an address, and runs each slice's --command in a home of its own; training on both slices
    runs at once, each with its slice id; a failing slice fails the launch."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_LOG"
case "$3 $4" in
  "queued-resources describe")
    [[ -e $FAKE_ROOT/created ]] || exit 1
    if [[ " $* " == *" --format=value(state.state) "* ]]; then
      n=$(cat "$FAKE_ROOT/looks" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_ROOT/looks"
      ((n)) && echo ACTIVE || echo PROVISIONING
    fi ;;
  "queued-resources create") touch "$FAKE_ROOT/created" ;;
  "tpu-vm describe") [[ $5 == osp-ms-0 ]] && echo 10.1.2.3 ;;
  "tpu-vm scp") mkdir -p "$FAKE_ROOT/$(dirname "${6/://}")" && cp "$5" "$FAKE_ROOT/${6/://}" ;;
  "tpu-vm ssh") prev=""; for a; do [[ $prev == --command ]] && cmd=$a; prev=$a; done
       mkdir -p "$FAKE_ROOT/$5" && cd "$FAKE_ROOT/$5" && HOME=$PWD exec bash -c "$cmd" ;;
  *) exit 3 ;;
esac
""")
    write_exe(bin_dir / "sleep", "#!/usr/bin/env bash\n")  # the wait for ACTIVE: no real 30 s
    write_exe(bin_dir / "python3", r"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m uv venv" ]]; then
  dir=${!#}; mkdir -p "$dir/bin"
  printf '%s\n' '#!/usr/bin/env bash' \
    'env | grep ^MEGASCALE_ | sort > "$HOME/megascale"; echo "training slice $MEGASCALE_SLICE_ID"' \
    '[[ $MEGASCALE_SLICE_ID != "$FAIL_SLICE" ]] || exit 7' > "$dir/bin/python"
  chmod +x "$dir/bin/python"
fi
""")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "setup.py").write_text("# package\n")
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_ROOT=str(tmp_path),
                    TMPDIR=str(tmp_path), FAIL_SLICE="" if failing_slice is None else str(failing_slice))
    proc = sh(TPU, *MULTISLICE, "--package", str(pkg), "--", "--workdir=gs://b/run", env=env, check=False)
    calls = log.read_text()
    assert "queued-resources create osp-ms" in calls and "PROVISIONING" in proc.stdout
    for slice_id, name in enumerate(["osp-ms-0", "osp-ms-1"]):
        megascale = (tmp_path / name / "megascale").read_text().split()
        assert megascale == ["MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3", "MEGASCALE_NUM_SLICES=2", "MEGASCALE_PORT=8080",
                             f"MEGASCALE_SLICE_ID={slice_id}"]
        assert (tmp_path / name / "osp_jax_run" / "src" / "setup.py").exists()
    assert "training slice 0" in proc.stdout and "[osp-ms-1] training slice 1" in proc.stdout
    assert proc.returncode == (0 if failing_slice is None else 7), proc.stderr


# ---------------------------------------------------------------------------------- gpu_multinode.sh

def gpu_dry_run(*args, **env):
    env.setdefault("SLURM_JOB_NODELIST", "node1,node2")
    env.setdefault("SLURM_NNODES", "2")
    out = sh(GPU, *args, "--dry-run", "--", *TRAIN_ARGS, env=clean_env(**env)).stdout
    exports = dict(c[1].split("=", 1) for c in commands(out) if c[0] == "export")
    (srun,) = [c for c in commands(out) if c[0] == "srun"]
    return exports, srun


def test_gpu_dry_run_per_node():
    exports, srun = gpu_dry_run()
    host, port = exports["OSP_COORDINATOR_ADDRESS"].split(":")
    assert host == "node1" and port.isdigit()
    assert exports["OSP_NUM_PROCESSES"] == "2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"].split()
    assert "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    assert after_train(srun) == TRAIN_ARGS
    task = srun[srun.index("-c") + 1]
    assert "OSP_PROCESS_ID=$SLURM_PROCID" in task and "CUDA_VISIBLE_DEVICES" not in task


def test_gpu_dry_run_per_gpu():
    exports, srun = gpu_dry_run("--per-gpu", "--port", "23456")
    assert exports["OSP_COORDINATOR_ADDRESS"] == "node1:23456"
    assert exports["OSP_NUM_PROCESSES"] == "16"
    assert "--ntasks=16" in srun and "--ntasks-per-node=8" in srun
    assert "CUDA_VISIBLE_DEVICES" in srun[srun.index("-c") + 1]
    assert after_train(srun) == TRAIN_ARGS


def test_gpu_dry_run_defaults_and_bracketed_nodelist():
    exports, _ = gpu_dry_run(SLURM_JOB_NODELIST="gpu[007-010,12],big1", SLURM_NNODES="5")
    assert exports["OSP_COORDINATOR_ADDRESS"].startswith("gpu007:")
    assert exports["OSP_NUM_PROCESSES"] == "5"
    # With nothing from SLURM, a dry run fakes two nodes.
    out = sh(GPU, "--dry-run", "--", "-x").stdout
    assert "OSP_NUM_PROCESSES=2" in out and "OSP_COORDINATOR_ADDRESS=node1:" in out


def test_gpu_outside_slurm_and_bad_options_exit_2():
    proc = sh(GPU, "--", "-x", check=False)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST" in proc.stderr
    proc = sh(GPU, "--gpus-per-node", "eight", "--dry-run", check=False)
    assert proc.returncode == 2 and "--gpus-per-node" in proc.stderr
    proc = sh(GPU, "--bogus", check=False)
    assert proc.returncode == 2 and "--bogus" in proc.stderr
    assert "Usage:" in sh(GPU, "--help").stdout


def test_gpu_xla_flags_are_known_to_xla():
    """XLA aborts on an unknown XLA_FLAGS entry; GPU flags are parsed on CPU too, so check here."""
    exports, _ = gpu_dry_run()
    env = clean_env(XLA_FLAGS=exports["XLA_FLAGS"], JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", "import jax; print(int(jax.numpy.ones(3).sum()))"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]


@pytest.mark.parametrize("per_gpu,visible", [(False, "0,1,2,3,4,5,6,7"), (True, "0,1,2,3,4,5,6,7"), (True, "5"),
                                             (True, "0,1")])
def test_gpu_real_run_against_fake_slurm(tmp_path, per_gpu, visible):
    """Not a dry run: a fake srun starts every task with its SLURM_PROCID/SLURM_LOCALID. Per GPU, a task
    keeps the one GPU SLURM bound to it ("5": --gpus-per-task=1, where LOCALID 3 named a GPU it cannot
    see), takes the LOCALID-th of the node's, or stops when LOCALID is past the GPUs it sees."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "scontrol", r"""#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a01\ngpu-a02\n'
""")
    write_exe(bin_dir / "srun", r"""#!/usr/bin/env bash
while [[ $1 == --* ]]; do
  case $1 in --ntasks=*) n=${1#*=} ;; --ntasks-per-node=*) per=${1#*=} ;; esac; shift
done
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit
done
exit 0
""")
    write_exe(bin_dir / "fakepython", r"""#!/usr/bin/env bash
{ printf '%s\0' "$@"; } > "$OUT/args.$OSP_PROCESS_ID"
echo "$OSP_COORDINATOR_ADDRESS $OSP_NUM_PROCESSES ${CUDA_VISIBLE_DEVICES-unset}" > "$OUT/env.$OSP_PROCESS_ID"
""")
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path),
                    SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2",
                    CUDA_VISIBLE_DEVICES=visible)
    flags = ["--per-gpu"] if per_gpu else []
    proc = sh(GPU, *flags, "--python", str(bin_dir / "fakepython"), "--", *TRAIN_ARGS, env=env, check=False)
    if visible == "0,1":  # 8 tasks a node, 2 GPUs seen: task 2 has none of its own
        assert proc.returncode != 0 and "local id 2 but CUDA_VISIBLE_DEVICES=0,1" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr

    n = 16 if per_gpu else 2
    for rank in range(n):
        assert (tmp_path / f"args.{rank}").read_text().split("\0")[:-1] == ["-m", "osp_jax.train", *TRAIN_ARGS]
        addr, nproc, cuda = (tmp_path / f"env.{rank}").read_text().split()
        assert addr == "gpu-a01:12355" and nproc == str(n)
        assert cuda == (visible if not per_gpu or visible == "5" else str(rank % 8))
    assert not (tmp_path / f"args.{n}").exists()
