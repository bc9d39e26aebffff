"""The pure train step: gradient accumulation, and `model.precast_weights` (same step, casts hoisted)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from osp_jax.model import Transformer, abstract_params, precast_weights
from osp_jax.optim import make_optimizer
from osp_jax.step import init_state, train_step
from tests.helpers import small_config


def _config(*, optimizer="adamw", accum=1, **model):
    cfg = small_config(**model)
    cfg.optimizer.name = optimizer
    cfg.optimizer.grad_accum_steps = accum
    cfg.optimizer.warmup_steps = 0
    cfg.train.global_batch_size = 4
    return cfg


def _batch(cfg, n=4, seed=0):
    seq = cfg.train.seq_len
    toks = jax.random.randint(jax.random.key(seed), (n, seq + 1), 0, cfg.model.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": jnp.ones((n, seq), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq), (n, seq))}


def _padded_batch(cfg, n=4, seed=0, keep=(3, 16, 8, 16)):
    """`_batch` with row i padded (segment id 0) after its first keep[i] tokens. Micro-batch 0 of two takes
    rows 0 and 2 (11 tokens), micro-batch 1 rows 1 and 3 (32): a mean of the two micro-batch means would
    weight micro-batch 0's tokens three times as much."""
    batch = _batch(cfg, n, seed)
    batch["segment_ids"] = (jnp.arange(cfg.train.seq_len)[None] < jnp.asarray(keep)[:, None]).astype(jnp.int32)
    return batch


@functools.lru_cache(maxsize=None)
def _initial_state(optimizer: str, model_items: tuple):
    """The step-0 state of `_config(optimizer, **dict(model_items))`, made once a process: grad_accum_steps
    does not enter it (init_state reads the model and train.seq_len), so a run and its accumulated twin
    start from this one state."""
    cfg = _config(optimizer=optimizer, **dict(model_items))
    return init_state(cfg, Transformer(cfg.model), make_optimizer(cfg)[0], jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _compiled_step(optimizer: str, accum: int, model_items: tuple):
    """The jitted train step of that config, kept so that tests of one config share its compile."""
    cfg = _config(optimizer=optimizer, accum=accum, **dict(model_items))
    tx, _ = make_optimizer(cfg)
    return jax.jit(functools.partial(train_step, model=Transformer(cfg.model), tx=tx, grad_accum_steps=accum))


def _step(optimizer="adamw", accum=1, steps=2, batch=_batch, **model):
    """`steps` train steps of `_config(optimizer, accum, **model)` on `batch(cfg, seed=i)`: the (loss, grad norm)
    of each, and the state after them."""
    cfg = _config(optimizer=optimizer, accum=accum, **model)
    key = tuple(sorted(model.items()))
    state, step = _initial_state(optimizer, key), _compiled_step(optimizer, accum, key)
    seen = []
    for i in range(steps):
        state, metrics = step(state, batch(cfg, seed=i))
        seen.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return seen, state


@pytest.mark.parametrize("optimizer,batches,model", [("adamw", (_batch, _padded_batch), {}),
                                                     ("muon", (_padded_batch,), {}),
                                                     ("adamw", (_padded_batch,), {"loss_fused": True, "loss_chunk": 8})],
                         ids=["adamw-plain-and-padded", "muon-padded", "adamw-padded-fused"])
def test_accumulated_micro_batches_equal_one_batch(optimizer, batches, model):
    """Two micro-batches of 2 give the step one batch of 4 gives (every token counts, float32), also when
    padding leaves them unequal token counts (and with model.loss_fused, whose weights the step gives before
    the forward pass): the same loss and gradient norm over two steps (Adam's first update does not see the
    gradient's scale, the norm does), and parameters equal to well within an update (lr 3e-3). The first
    step's loss is the mean over the batch's unpadded tokens, in float64. (One config's batches share its
    two compiled steps.)"""
    start = _initial_state(optimizer, tuple(sorted(model.items()))).params
    for batch in batches:
        want_seen, want = _step(optimizer, batch=batch, **model)
        got_seen, got = _step(optimizer, accum=2, batch=batch, **model)
        np.testing.assert_allclose(got_seen, want_seen, rtol=1e-5, err_msg=batch.__name__)
        # Muon orthogonalises in bfloat16, where float32 rounding differences in the summed gradient can flip
        # a rounding: there the parameters agree to within 5% of the two steps' largest update (measured: 1.6%).
        moved = max(float(np.abs(np.asarray(w) - np.asarray(p)).max())
                    for w, p in zip(jax.tree.leaves(want.params), jax.tree.leaves(start)))
        atol = 2e-5 if optimizer == "adamw" else 0.05 * moved
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), got.params, want.params)
        cfg = _config(optimizer=optimizer)
        first = batch(cfg, seed=0)
        mask = np.asarray(first["segment_ids"] > 0)
        np.testing.assert_allclose(got_seen[0][0], _f64_losses(Transformer(cfg.model), start, first)[mask].mean(),
                                   rtol=1e-6, err_msg=batch.__name__)


def _one_step(cfg, tx, state, batch):
    return jax.jit(functools.partial(train_step, model=Transformer(cfg.model), tx=tx))(state, batch)


def _constant_rates(cfg, schedules, step: int):
    """`cfg` with constant learning rates: the values of `schedules` at `step`."""
    const = _config(optimizer=cfg.optimizer.name)
    const.optimizer.schedule = "constant"
    const.optimizer.learning_rate = float(schedules["learning_rate"](step))
    if "muon_learning_rate" in schedules:
        const.optimizer.muon_learning_rate = float(schedules["muon_learning_rate"](step))
    return const


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_skipped_steps_leave_the_schedule_on_the_logged_step(optimizer):
    """Two non-finite steps, then a finite one: its update is the one constant learning rates at the
    schedules' values for step 2 give (what train logs for step 3: fn(step - 1)), not step 0's (0 in the
    warmup). The moments' own counts stay at the one update they saw."""
    cfg = _config(optimizer=optimizer)
    cfg.optimizer.warmup_steps = 4
    model = Transformer(cfg.model)
    tx, schedules = make_optimizer(cfg)
    start = init_state(cfg, model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))  # one compile for the three steps
    poisoned = _batch(cfg)
    poisoned["inputs"] = jnp.full_like(poisoned["inputs"], cfg.model.vocab_size + 7)  # embedded as NaN
    state = start
    for _ in range(2):
        state, metrics = step(state, poisoned)
        assert int(metrics["skipped"]) == 1
    state, metrics = step(state, _batch(cfg))
    assert int(metrics["skipped"]) == 0 and int(state.step) == 3

    const = _constant_rates(cfg, schedules, int(state.step) - 1)
    assert 0 < const.optimizer.learning_rate < cfg.optimizer.learning_rate  # inside the warmup
    ref_tx, _ = make_optimizer(const)
    # init_state(const, ...) without a second model.init: the same parameters, the constant rates' fresh state
    ref, _ = _one_step(const, ref_tx, start._replace(opt_state=ref_tx.init(start.params)), _batch(cfg))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), state.params, ref.params)
    counts = {}
    for node in jax.tree.leaves(state.opt_state, is_leaf=lambda n: "count" in getattr(n, "_fields", ())):
        counts.setdefault(type(node).__name__, set()).add(int(node.count))
    assert counts["ScaleByScheduleState"] == {3} and counts["ScaleByAdamState"] == {1}, counts


def test_schedules_at_reaches_the_schedules_of_any_optax_chain():
    """Optax's two ways to schedule (scale_by_schedule, under every optimizer given a schedule; and
    inject_hyperparams) read the step given, at any depth; Adam's bias-correction count is left alone."""
    import optax

    from osp_jax.optim import schedules_at

    ramp = optax.linear_schedule(0.0, 1.0, 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=ramp),
                     optax.sgd(ramp))
    params = {"w": jnp.ones(3)}
    updates, state = tx.update({"w": jnp.full(3, 0.5)}, schedules_at(tx.init(params), 7), params)
    inject = state[1]
    np.testing.assert_allclose(float(inject.hyperparams["learning_rate"]), 0.7, rtol=1e-6)
    assert int(inject.count) == 8 and int(inject.inner_state[0].count) == 1  # Adam's: one update seen
    # Adam's first step is -lr * g / |g| = -0.7; sgd then scales it by -0.7, its rate at step 7 too.
    np.testing.assert_allclose(np.asarray(updates["w"]), 0.49, rtol=1e-5)


def test_precast_weights_casts_the_matmul_weights_only():
    cfg = small_config(dtype="bfloat16")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(abstract_params(cfg.model)))
    cast = precast_weights(params, cfg.model)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
    bf16 = {k for k, d in dtypes.items() if d == jnp.bfloat16}
    assert bf16 == {k for k in dtypes if k.endswith("['kernel']") and "lm_head" not in k} | {"['embed']['embedding']"}
    tied = precast_weights(params, small_config(dtype="bfloat16", tie_embeddings=True).model)
    assert tied["embed"]["embedding"].dtype == jnp.float32  # it is the LM head too


@pytest.mark.parametrize("accum,scan,remat", [(1, False, "dots"), (2, True, "full")])
def test_precast_weights_takes_the_same_step(accum, scan, remat):
    """Cast once or in every layer call, the bf16 step computes the same values."""
    model = dict(dtype="bfloat16", scan_layers=scan, remat=remat)
    want_seen, want = _step(accum=accum, **model)
    got_seen, got = _step(accum=accum, precast_weights=True, **model)
    np.testing.assert_allclose(got_seen, want_seen, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got.params, want.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((got.params, got.opt_state)) if x.ndim)


def _weight_casts(jaxpr, shapes, inside=()):
    """(enclosing primitives, shape) of every float32 -> bfloat16 cast of a weight-shaped value."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16:
            aval = eqn.invars[0].aval
            if aval.dtype == jnp.float32 and tuple(aval.shape) in shapes:
                found.append((inside, tuple(aval.shape)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _weight_casts(sub, shapes, inside + (eqn.primitive.name,))
    return found


@pytest.mark.parametrize("scan", [False, True])
def test_precast_weights_leaves_no_weight_cast_in_the_loops_or_the_remat(scan):
    """With the flag, the weights are cast once, at the top of the step: none inside the
    accumulation scan, a layer scan or a rematerialised layer (without it, casts sit in all of them)."""
    def casts(precast):
        cfg = _config(accum=2, dtype="bfloat16", scan_layers=scan, remat="dots", precast_weights=precast)
        model = Transformer(cfg.model)
        tx, _ = make_optimizer(cfg)
        state = jax.eval_shape(functools.partial(init_state, cfg, model, tx), jax.random.key(0))
        # the weights precast_weights casts (the LM head keeps its own cast, in every micro-batch)
        cast = [s for s in jax.tree.leaves(jax.eval_shape(functools.partial(precast_weights, model_config=cfg.model),
                                                          state.params)) if s.dtype == jnp.bfloat16]
        shapes = {s.shape for s in cast} | {s.shape[1:] for s in cast if scan and s.ndim > 2}
        step = functools.partial(train_step, model=model, tx=tx, grad_accum_steps=2)
        return _weight_casts(jax.make_jaxpr(step)(state, _batch(cfg)).jaxpr, shapes)

    remat = lambda inside: any(p == "checkpoint" or p.startswith("remat") for p in inside)  # jax's names for it
    before = casts(False)
    assert any("scan" in inside for inside, _ in before) and any(remat(inside) for inside, _ in before)
    after = casts(True)
    assert after and all(inside == () for inside, _ in after), after


def test_without_pack_mask_a_window_is_one_stream():
    """data.pack_mask=False: documents attend to each other, so positions run 0..seq-1 over the window,
    as a plain causal LM (the exported Llama) reads it; they used to restart at each document."""
    from osp_jax.step import token_losses

    cfg = _config()
    model = Transformer(cfg.model)
    seq, first = cfg.train.seq_len, cfg.train.seq_len // 2  # two documents in one packed window
    batch = _batch(cfg, n=1)
    batch["segment_ids"] = jnp.asarray([[1] * first + [2] * (seq - first)], jnp.int32)
    batch["positions"] = jnp.asarray([list(range(first)) + list(range(seq - first))], jnp.int32)
    params = _initial_state("adamw", ()).params
    got, _ = token_losses(model, params, batch, pack_mask=False)
    stream = model.apply({"params": params}, batch["inputs"], targets=batch["targets"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(stream), rtol=1e-6)
    packed, _ = token_losses(model, params, batch, pack_mask=True)
    np.testing.assert_allclose(np.asarray(packed)[:, :first], np.asarray(stream)[:, :first], rtol=1e-6)
    assert not np.allclose(np.asarray(packed)[:, first:], np.asarray(stream)[:, first:])


def _f64_losses(model, params, batch):
    """Per-token cross-entropy in float64 from the model's float32 logits."""
    logits = np.asarray(model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"]), np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]


@pytest.mark.parametrize("weights", [False, True])
def test_eval_step_is_one_loss_for_train_and_evaluate(weights):
    """Train's validation loss (segment ids > 0 scored) and evaluate's (its own `weights`, cut at
    --max-tokens), with and without the outlier statistics (which take the loss from the logits): one
    function, equal to a float64 reference; sums and counts, so batches combine exactly."""
    from osp_jax import metrics
    from osp_jax.step import eval_step

    cfg = _config(loss_chunk=8)
    model = Transformer(cfg.model)
    batch = _batch(cfg, n=3)
    batch["segment_ids"] = batch["segment_ids"].at[2, 10:].set(0)  # padding: never scored
    params = _initial_state("adamw", (("loss_chunk", 8),)).params
    mask = np.asarray(batch["segment_ids"] > 0, np.float64)
    if weights:
        mask[0, 5:] = 0.0
        batch["weights"] = jnp.asarray(mask, jnp.float32)
    want = (_f64_losses(model, params, batch) * mask).sum()
    plain = jax.jit(functools.partial(eval_step, model=model))(params, batch)
    full = jax.jit(functools.partial(eval_step, model=model, outliers=True))(params, batch)
    for got in (plain, full):
        assert float(got["tokens"]) == mask.sum()
        np.testing.assert_allclose(float(got["loss_sum"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(plain["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)
    # The outlier sums divided by the count are train's per-layer means over the same tokens.
    _, hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], return_hidden=True)
    ref = metrics.outlier_stats(hidden, jnp.asarray(mask))
    np.testing.assert_allclose(full["kurtosis_sum"] / full["tokens"], ref["kurtosis_per_layer"], rtol=1e-5)
    np.testing.assert_array_equal(full["max_abs"], ref["max_abs_per_layer"])
    linear = sorted(k.split(".")[0] for k in full if k.endswith(".max_abs"))
    assert linear == ["down_in", "gate_up_in", "o_in", "qkv_in"]
