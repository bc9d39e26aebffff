"""osp_jax as an lm-evaluation-harness model: a training run's checkpoint, fake-quantised, scored in JAX.

Importing this module registers the model `osp_jax` with lm-eval (after lm-eval's own models: lm-eval fills
its registry with them only while it is empty, so registering first would hide `hf` and the rest):

    import osp_jax.lm_eval_backend
    lm_eval.simple_evaluate(model="osp_jax", model_args={"workdir": "runs/x", "bits": "4-4-4"}, tasks=[...])

From the shell, `python -m osp_jax.lm_eval --model osp_jax --model_args workdir=runs/x,bits=4-4-4 ...`
(osp_jax/lm_eval.py says why the bare `lm_eval` command cannot find it).

model_args (lm-eval splits them on commas, hence `4-4-4`):
  workdir       the training run: checkpoints/, the tokenizer train copied (tokenizer.json or .model)
  step          checkpoint step (default: the latest)
  bits          W-A-KV bit widths in 2..16, e.g. 4-4-4 (default 16-16-16: not quantised)
  hadamard      ffn: the online FFN Hadamard rotation; none (default)
  method        post-training quantisation method, as osp_jax.ptq takes it (default rtn)
  clip_search   true: per-channel MSE search of weight clip ratios (default false)
  batch_size    sequences a forward pass (default 8; rounded up to a multiple of the batch's shards); from
                the lm_eval command line it is lm-eval's own --batch_size (default 1), not a model_arg
  max_length    tokens of context (default: the run's train.seq_len)
  max_gen_toks  tokens generate_until adds when a task does not say (default 256, as lm-eval's hf backend)
  devices       how many of the local devices to use (default: all)

Each request is what lm-eval's own `hf` backend makes of it, so the two agree on an exported model:
- loglikelihood: context + continuation cut from the left to max_length + 1 tokens; the continuation's
  log-probability and whether greedy decoding gives it. An empty context is the EOS token (lm-eval's prefix).
- loglikelihood_rolling: lm-eval's rolling windows of max_length tokens, EOS first, summed.
- generate_until: greedy, until EOS, a stop string or max_gen_toks; the context cut from the left to
  max_length - max_gen_toks tokens; the text cut at the first stop string.
Requests run longest first in batches (lm-eval's Collator), padded on the right to a power-of-two length,
so a run compiles a few shapes rather than one a length. Padding never reaches a real token: attention is
causal and the quantisers of activations and keys/values are per token.

The model is `osp_jax.ptq.quantize_model`'s at `bits` by `method` (EmbProj folded, so what is scored is
what export writes) in every call, in float32 with exact XLA attention. Its parameters are laid out on the
devices by training's logical-axis rules (osp_jax.sharding): on the run's mesh where it fits the devices
present, else fsdp over all of them. The checkpoint is read at the first request, after lm-eval has checked
the task names and loaded their data. That model side (the run, its mesh, the jitted passes) is osp_jax.scoring's;
this module turns lm-eval's requests into its batches.
"""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

import lm_eval.models  # noqa: F401 - lm-eval's own models first (see the module doc)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from osp_jax import ptq, sharding
from osp_jax import quant as quant_lib
from osp_jax.partitioning import check_mesh_fits
from osp_jax.scoring import (  # noqa: F401 - re-exported: defined here before osp_jax.scoring held them
    BackendError, Runner, RunCheckpoint, check_bits, eval_mesh, eval_model_config, next_tokens, token_scores)

MODEL_NAME = "osp_jax"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend's
MIN_BUCKET = 16             # the shortest padded length: shorter rows share one compiled shape


# ----------------------------------------------------------------------------------------------------
# model_args


def parse_bits(value) -> quant_lib.Bits:
    """'4-4-4' (model_args split on commas), '4,4,4', a sequence of three ints or Bits -> Bits."""
    if isinstance(value, quant_lib.Bits):
        return value
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value).replace("-", ",")
    try:
        return quant_lib.parse_bits(text)
    except ValueError:
        raise BackendError(f"bits={value!r}: expected W-A-KV bit widths in {quant_lib.MIN_BITS}..{quant_lib.NO_QUANT}, "
                           f"e.g. 4-4-4 ({quant_lib.NO_QUANT} = not quantised)") from None


def parse_hadamard(value) -> bool:
    """'ffn' -> True; None, 'none' or False -> False."""
    if value in (None, False, "none", ""):
        return False
    if value == "ffn":
        return True
    raise BackendError(f"hadamard={value!r}: expected 'ffn' or 'none'")


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise BackendError(f"{name}={value!r}: expected true or false")


def _count(name: str, value, default: int | None) -> int | None:
    """A positive integer model_arg (None: `default`)."""
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise BackendError(f"{name}={value!r}: expected a positive integer")
    return number


def setting_name(bits: quant_lib.Bits, hadamard_ffn: bool, method: str = "rtn") -> str:
    """The paper's name of a quantisation setting: '16-16-16', '4-4-4 +FFN Had' (a method other than RTN
    after it)."""
    name = f"{bits.w}-{bits.a}-{bits.kv}" + (" +FFN Had" if hadamard_ffn else "")
    return name if method == "rtn" else f"{name} {method}"


# ----------------------------------------------------------------------------------------------------
# What a model can run, checked from its config alone (before the checkpoint is read)


def check_generation(what: str, max_gen_toks: int, max_length: int) -> None:
    """BackendError when `what` would generate so many tokens that no context fits in `max_length`."""
    if max_gen_toks >= max_length:
        raise BackendError(f"{what} generates up to {max_gen_toks} tokens, but the model reads at most "
                           f"{max_length} (max_length): no room is left for its prompt; generation needs "
                           "max_gen_toks < max_length")


def gen_settings(gen_kwargs: dict, default_max_gen_toks: int, what: str) -> tuple[list[str], int]:
    """(stop strings, max_gen_toks) of a request's generation kwargs; BackendError for sampling."""
    kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), default_max_gen_toks)
    if kwargs.get("do_sample"):
        raise BackendError(f"{what} asks for sampling (do_sample=true, temperature "
                           f"{kwargs.get('temperature')}); osp_jax generates greedily only")
    return list(kwargs["until"]), int(kwargs["max_gen_toks"])


def padded_length(n: int, cap: int) -> int:
    """`n` rounded up to a power of two (at least MIN_BUCKET), at most `cap`."""
    return min(cap, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


# ----------------------------------------------------------------------------------------------------


@register_model(MODEL_NAME)
class OspJaxLM(TemplateLM):
    """lm-eval's `osp_jax` model (see the module doc). `checkpoint=` (a RunCheckpoint) instead of
    `workdir=` shares one restored checkpoint between settings (osp_jax.evaluate --tasks does).
    `calibration=` (host batches, or a function of the run's config returning them, called when the model
    is built) goes to osp_jax.ptq.quantize_model as its `calibration`, for the methods that need it."""

    def __init__(self, workdir: str | None = None, step=None, bits="16-16-16", hadamard=None, method: str = "rtn",
                 clip_search=False, batch_size=DEFAULT_BATCH_SIZE, max_length=None, max_gen_toks=None,
                 devices=None, *, checkpoint: RunCheckpoint | None = None, calibration=None, device=None,
                 max_batch_size=None, **unknown):
        super().__init__()
        del device, max_batch_size  # lm-eval's torch device and auto batch sizing: JAX places the work itself
        if unknown:
            raise BackendError(f"model_args: unknown {', '.join(sorted(unknown))}; osp_jax takes workdir, step, bits, "
                               "hadamard, method, clip_search, batch_size, max_length, max_gen_toks, devices")
        if checkpoint is None and not workdir:
            raise BackendError("model_args: workdir=RUN_DIR (the training run to evaluate) is required")
        self.bits, self.hadamard_ffn = parse_bits(bits), parse_hadamard(hadamard)
        try:
            self.method = ptq.check_method(str(method))
        except ValueError as e:
            raise BackendError(str(e)) from None
        self.clip_search = _flag("clip_search", clip_search)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = None  # lm-eval's --batch_size auto: no search here, the default
        self._batch_size = _count("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self._max_gen_toks = _count("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
        self._devices = _count("devices", devices, None)
        self.checkpoint = checkpoint or RunCheckpoint(workdir, step)
        self._max_length_arg = _count("max_length", max_length, None)
        self._calibration = calibration
        self._runner: Runner | None = None
        self._mesh, self._rows = None, 0  # set by _check
        config = self.checkpoint.config()
        self.run_tokenizer = self.checkpoint.tokenizer(config.model.vocab_size if config is not None else None)
        self._pad_id = self.run_tokenizer.pad_id if self.run_tokenizer.pad_id is not None else self.eot_token_id
        if config is not None:  # else checked once the checkpoint (and its config) is read
            self._check(config)

    # -- lm-eval's interface ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.run_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length_arg or int(self._config().train.seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def setting(self) -> str:
        return setting_name(self.bits, self.hadamard_ffn, self.method)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.run_tokenizer.encode(string)  # osp_jax adds no special tokens (nor does its export)

    def tok_decode(self, ids) -> str:
        """Text of generated ids, special tokens left out (as lm-eval's hf backend decodes them)."""
        special = {self.eot_token_id, self._pad_id}
        return self.run_tokenizer.decode([int(i) for i in ids if int(i) not in special])

    def get_model_info(self) -> dict:
        return {"osp_jax_workdir": self.checkpoint.workdir, "osp_jax_setting": self.setting,
                "osp_jax_bits": list(self.bits), "osp_jax_hadamard": "ffn" if self.hadamard_ffn else None,
                "osp_jax_method": self.method}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each (request, context ids, continuation ids): (log p(continuation | context), greedy?)."""
        n = self.max_length
        for _, _, cont in requests:
            if len(cont) > n:
                raise BackendError(f"a continuation of {len(cont)} tokens does not fit the model's {n} (max_length)")
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="osp_jax loglikelihood") as bar:
            for chunk in order.get_batched(n=self._batch_rows()):
                windows = [(ctx + cont)[-(n + 1):] for _, ctx, cont in chunk]  # cut from the left
                length = padded_length(max(len(w) - 1 for w in windows), n)
                inputs = self._rows_of([w[:-1] for w in windows], length)
                targets = self._rows_of([w[1:] for w in windows], length)
                logp, greedy = self._run().score(inputs, targets)
                for i, (request, _, cont) in enumerate(chunk):
                    end = len(windows[i]) - 1
                    span = slice(end - len(cont), end)
                    answer = (float(np.sum(logp[i, span], dtype=np.float64)), bool(np.all(greedy[i, span])))
                    results.append(answer)
                    if request is not None:
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(len(chunk))
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint rolling windows of max_length tokens."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            pieces = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, pieces):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched by generation settings, longest context first."""
        eos_text = self.run_tokenizer.decode([self.eot_token_id])  # a stop string too, as in lm-eval's hf backend
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="osp_jax generate_until") as bar:
            for chunk in order.get_batched(n=self._batch_rows()):
                contexts, kwargs = zip(*chunk)
                until, max_gen = gen_settings(kwargs[0], self.max_gen_toks, "generate_until")
                until = handle_stop_sequences(until, eos=eos_text)
                check_generation("generate_until", max_gen, self.max_length)
                texts = self._greedy([self.tok_encode(c) for c in contexts], max_gen, until)
                for context, gen, text in zip(contexts, kwargs, texts):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen), text)
                bar.update(len(chunk))
        return order.get_original(results)

    def release(self) -> None:
        """Frees the model's device memory (the checkpoint stays read); a later request builds it again."""
        self._runner = None

    # -- the work --------------------------------------------------------------------------------------

    def _config(self):
        """The run's config: WORKDIR/config.json's, else the checkpoint's (read for it)."""
        return self.checkpoint.config() or self.checkpoint.restore()[2]

    def _check(self, config) -> None:
        """What the run's config alone tells: bits the quantisers take, a mesh its sizes split over."""
        check_bits(config.model, self.bits)
        self._mesh = eval_mesh(config, self._devices)
        shards = math.prod(self._mesh.shape[a] for a in sharding.BATCH_AXES)
        self._rows = -(-self._batch_size // shards) * shards
        fits = config.copy_and_resolve_references()
        fits.train.global_batch_size, fits.optimizer.grad_accum_steps = self._rows, 1
        try:
            check_mesh_fits(fits, self._mesh)
        except sharding.MeshError as e:
            raise BackendError(f"the model does not split over the {self._mesh.devices.size} device(s) present "
                               f"({dict(self._mesh.shape)}): {e}; pass devices=N") from None

    def _run(self) -> Runner:
        """The model, built at the first request: the checkpoint read, quantised, put on the mesh."""
        if self._runner is None:
            _, params, config = self.checkpoint.restore()
            if self._mesh is None:
                self._check(config)
            calibration = self._calibration(config) if callable(self._calibration) else self._calibration
            q = ptq.quantize_model(params, eval_model_config(config.model), self.bits, method=self.method,
                                   hadamard_ffn=self.hadamard_ffn, clip_search=self.clip_search,
                                   **({} if calibration is None else {"calibration": calibration}))
            self._runner = Runner(q, self._mesh)
        return self._runner

    def _batch_rows(self) -> int:
        self._run()
        return self._rows

    def _rows_of(self, seqs: list[list[int]], length: int) -> np.ndarray:
        """`seqs` left-aligned in a (rows, length) array of the pad id, one row a sequence."""
        rows = self._batch_rows()
        if len(seqs) > rows:
            raise ValueError(f"{len(seqs)} sequences for a batch of {rows} rows")
        out = np.full((rows, length), self._pad_id, np.int32)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out

    def _greedy(self, contexts: list[list[int]], max_gen: int, until: list[str]) -> list[str]:
        """Greedy continuations of `contexts` (each cut from the left to max_length - max_gen tokens):
        one forward pass a token over the whole padded batch (no KV cache: simple, and exact under the
        per-token quantisers), stopping each row at EOS or a stop string; cut at the first stop string."""
        made = self.greedy_ids(contexts, max_gen, until)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in made]

    def greedy_ids(self, contexts: list[list[int]], max_gen: int, until: list[str]) -> list[list[int]]:
        """The generated ids of `_greedy`, EOS left out."""
        n = self.max_length
        contexts = [c[-(n - max_gen):] or [self.prefix_token_id] for c in contexts]
        tokens = self._rows_of(contexts, n)
        lengths = np.ones(len(tokens), np.int32)
        lengths[:len(contexts)] = [len(c) for c in contexts]
        made: list[list[int]] = [[] for _ in contexts]
        active = [True] * len(contexts)
        for _ in range(max_gen):
            length = padded_length(int(lengths.max()), n)
            chosen = self._run().next(tokens[:, :length], lengths - 1)
            for i in range(len(contexts)):
                if not active[i]:
                    continue
                if int(chosen[i]) == self.eot_token_id:
                    active[i] = False
                    continue
                tokens[i, lengths[i]] = chosen[i]
                lengths[i] += 1
                made[i].append(int(chosen[i]))
                text = self.tok_decode(made[i])
                active[i] = not any(stop and stop in text for stop in until)
            if not any(active):
                break
        return made
