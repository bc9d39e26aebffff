"""`python -m osp_jax.lm_eval`: lm-evaluation-harness's own command line, with the `osp_jax` model in it.

    python -m osp_jax.lm_eval --model osp_jax --model_args workdir=runs/x,bits=4-4-4,hadamard=ffn \
        --tasks arc_easy,hellaswag [--num_fewshot N] [--limit N] [--output_path DIR] [any lm_eval flag]

Why not the bare `lm_eval --model osp_jax`: lm-eval (0.4.13, read for this) finds a model only in a registry
filled inside its own process (lm_eval.api.registry, from lm_eval.models.MODEL_MAPPING). It reads no entry
points, has no plugin hook, and --include_path adds task YAMLs, not models. Reaching into it at start-up
(a .pth file, sitecustomize, a task YAML that imports osp_jax) would be a hack, so this command is
lm-eval's `cli_evaluate` after `import osp_jax.lm_eval_backend` has registered `osp_jax`; every flag is
lm-eval's, and so is the output.

Before handing over it checks the --tasks names. osp_jax's own errors (bad model_args, a run it cannot
read or run at those bits) and a task whose data is not here (lm-eval loads the data before the backend
reads its checkpoint) end as one line with exit status 2, as osp_jax's other commands do.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from osp_jax import cli

PROG = "osp_jax.lm_eval"
# Data that cannot be had comes out of the datasets library as these (offline: ConnectionError).
USER_ERRORS = {cli.UserError: "error", ConnectionError: "error", FileNotFoundError: "error"}


def task_names(argv: list[str]) -> tuple[list[str], str | None]:
    """The registry names among lm-eval's --tasks (not YAML files or folders), and its --include_path."""
    if argv and argv[0] in ("ls", "validate"):
        return [], None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tasks", "-t", nargs="+", default=[])
    p.add_argument("--include_path", default=None)
    known, _ = p.parse_known_args(argv)
    names = [n for value in known.tasks for n in value.split(",") if n]
    return [n for n in names if not n.endswith(".yaml") and not os.path.exists(n)], known.include_path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        if importlib.util.find_spec("lm_eval") is None:
            raise cli.UserError("this is lm-evaluation-harness's command line: pip install 'osp_jax[eval]'")
        from osp_jax import benchmark_tasks, lm_eval_backend  # noqa: F401 - the import registers `osp_jax`

        names, include_path = task_names(argv)
        if names:
            benchmark_tasks.resolve(names, benchmark_tasks.task_manager(include_path))
        from lm_eval.__main__ import cli_evaluate

        saved, sys.argv = sys.argv, ["lm_eval", *argv]  # lm-eval's parser reads sys.argv itself
        try:
            cli_evaluate()
        finally:
            sys.argv = saved

    return cli.guarded(PROG, run, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
