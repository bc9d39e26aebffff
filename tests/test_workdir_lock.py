"""One writer per workdir (osp_jax.workdir_lock): processes racing for one lock, on a local disk and on the GCS
emulator; exactly one holds it, the others are told who does; a SIGKILLed holder's lock is taken over."""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Waits for GO to exist, then tries the lock; prints one JSON line saying what happened; a holder keeps the lock
# until RELEASE exists.
CONTENDER = r"""
import json, os, sys, time
from osp_jax import workdir_lock
workdir, go, release = sys.argv[1:4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
lock = workdir_lock.WorkdirLock(workdir)
try:
    lock.acquire()
except workdir_lock.WorkdirBusy as e:
    print(json.dumps({"held": False, "message": str(e)}), flush=True)
    sys.exit(2)
print(json.dumps({"held": True, "pid": os.getpid()}), flush=True)
while not os.path.exists(release):
    time.sleep(0.05)
lock.release()
"""


def _start(workdir: str, go, release, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return [subprocess.Popen([sys.executable, "-c", CONTENDER, workdir, str(go), str(release)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def _first_line(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return json.loads(line)


def _race(workdir: str, tmp_path, n: int = 3):
    """Starts `n` contenders at once; returns (the holder, the others' messages)."""
    go, release = tmp_path / "go", tmp_path / "release"
    procs = _start(workdir, go, release, n)
    for p in procs:  # all imported and waiting
        assert p.stdout.readline() == "ready\n", p.stderr.read()
    go.touch()
    results = [(p, _first_line(p)) for p in procs]
    holders = [p for p, r in results if r["held"]]
    refused = [r["message"] for p, r in results if not r["held"]]
    for p, r in results:
        if not r["held"]:
            assert p.wait(timeout=30) == 2
    return holders, refused, release


def _check_race(workdir: str, tmp_path):
    holders, refused, release = _race(workdir, tmp_path)
    assert len(holders) == 1, refused
    (holder,) = holders
    assert len(refused) == 2
    for message in refused:  # names the holder: host, PID, start time
        assert f"PID {holder.pid}" in message and "host " in message and "started 20" in message, message
        assert "train.lock" in message
    return holder, release


def test_one_holder_among_racing_processes_and_a_killed_holder_is_taken_over_locally(tmp_path):
    workdir = str(tmp_path / "run")
    holder, release = _check_race(workdir, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert os.path.exists(os.path.join(workdir, "train.lock"))  # left behind by the killed holder
    (tmp_path / "round2").mkdir()
    holder2, release2 = _check_race(workdir, tmp_path / "round2")
    release2.touch()
    assert holder2.wait(timeout=30) == 0
    assert not os.path.exists(os.path.join(workdir, "train.lock"))  # removed at release


def test_a_refused_lock_leaves_no_directory_behind(tmp_path):
    from osp_jax import workdir_lock

    workdir = tmp_path / "run"
    with workdir_lock.WorkdirLock(workdir):
        other = workdir_lock.WorkdirLock(workdir)
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"PID {os.getpid()}"):
            other.acquire()
    assert not workdir.exists()  # made for the lock, empty after it: removed


def test_one_holder_among_racing_processes_and_a_killed_holder_is_taken_over_on_gcs(gcs_bucket, gcs_emulator, tmp_path):
    workdir = f"{gcs_bucket}/run"
    holder, release = _check_race(workdir, tmp_path)
    assert gcs_emulator.objects(gcs_bucket, "run/") == ["run/train.lock"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert gcs_emulator.objects(gcs_bucket, "run/") == ["run/train.lock"]  # left behind by the killed holder
    (tmp_path / "round2").mkdir()
    holder2, release2 = _check_race(workdir, tmp_path / "round2")
    release2.touch()
    assert holder2.wait(timeout=30) == 0
    assert gcs_emulator.objects(gcs_bucket, "run/") == []  # deleted at release


def test_a_stale_gcs_lock_of_another_host_is_taken_over_only_after_its_heartbeat_stops(gcs_bucket, monkeypatch):
    from google.cloud import storage

    from osp_jax import workdir_lock

    bucket = storage.Client(project=None).bucket(gcs_bucket.removeprefix("gs://"))
    blob = bucket.blob("run/train.lock")
    other = workdir_lock.Holder("another-host", 4242, "2026-01-01T00:00:00+00:00", "boot", "1")
    blob.upload_from_string(other.to_json(), if_generation_match=0)
    with pytest.raises(workdir_lock.WorkdirBusy, match="host another-host, PID 4242.*last heartbeat"):
        workdir_lock.WorkdirLock(f"{gcs_bucket}/run").acquire()
    monkeypatch.setattr(workdir_lock, "STALE_AFTER_S", 0.0)  # as if its heartbeat had stopped long ago
    lock = workdir_lock.WorkdirLock(f"{gcs_bucket}/run").acquire()
    assert workdir_lock.Holder.parse(bucket.get_blob("run/train.lock").download_as_text()).pid == os.getpid()
    lock.release()


def test_a_gcs_workdir_in_a_missing_bucket_or_refused_is_one_line(gcs_emulator):
    from osp_jax import cli, workdir_lock

    with pytest.raises(cli.UserError, match=r"--workdir=gs://no-such-bucket-x/run: cannot write there: "
                                                       r"the bucket does not exist"):
        workdir_lock.WorkdirLock("gs://no-such-bucket-x/run").acquire()
