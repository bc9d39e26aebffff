"""Weights & Biases as one more sink of `metrics.MetricWriter` (`train.wandb_project`; `pip install
'osp_jax[wandb]'`): the numbers of every record metrics.jsonl gets, at the same steps, and the resolved
config. One W&B run a workdir: its id is kept in WORKDIR/wandb_run_id, so a resumed run logs on into the
run it started (`wandb.init(id=..., resume="allow")`).

W&B's own settings come from its environment variables: WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline
(then `wandb sync` uploads later), WANDB_DIR. Without WANDB_DIR its local files go to WORKDIR/wandb when
the workdir is local, else to the current directory (W&B needs a local folder).
"""

from __future__ import annotations

import logging
import os
import uuid

from etils import epath

from osp_jax import cli

log = logging.getLogger("osp_jax")

RUN_ID_FILE = "wandb_run_id"


def run_id(workdir: str) -> str:
    """The W&B run id of the run in `workdir`: the one WORKDIR/wandb_run_id holds, else a new one, written
    there (atomically) before W&B sees it, so that every later start of this run finds it."""
    path = epath.Path(workdir) / RUN_ID_FILE
    try:  # read, not listed: a cached listing of a gs:// workdir may not show the file yet
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    new = uuid.uuid4().hex[:12]  # W&B ids: [a-z0-9], unique in the project
    cli.write_text_atomic(path, new + "\n")
    return new


class WandbSink:
    """A W&B run logging `MetricWriter`'s numbers at their training steps."""

    def __init__(self, workdir: str, project: str, run_config: dict | None):
        import wandb

        rid = run_id(workdir)
        local = cli.is_local(os.fspath(workdir)) and not os.environ.get("WANDB_DIR")
        try:
            self._run = wandb.init(project=project, id=rid, resume="allow", config=run_config,
                                   name=epath.Path(workdir).name, dir=os.fspath(workdir) if local else None)
        except Exception as e:  # noqa: BLE001 - W&B's own errors (no API key, no network) differ by version
            raise cli.UserError(f"config.train.wandb_project={project!r}: W&B could not start run {rid}: "
                                f"{cli.one_line(e)} (set WANDB_API_KEY, or WANDB_MODE=offline and `wandb sync` "
                                "later)") from e
        self._skipped = False

    def write(self, step: int, values: dict) -> None:
        # W&B refuses steps below its run's last one: after a resume from an earlier checkpoint, the steps
        # trained again up to where the interrupted attempt had logged (metrics.abandoned.jsonl has them).
        if step < self._run.step:
            if not self._skipped:
                log.info("W&B run %s is already at step %d: steps before it are not logged again",
                         self._run.id, self._run.step)
                self._skipped = True
            return
        self._run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)
