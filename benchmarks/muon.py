"""Optimizer-update time: osp_jax's Muon against optax.contrib.muon and AdamW.

One jitted optimizer update (gradients given, state donated) on the paper's 1.4B parameter tree, built
from shapes alone with random gradients made on the device. All optimizers run in the same process
on the same device; each figure is the median of `--iters` runs after a warm-up.

    python benchmarks/muon.py            # the 1.4B tree (needs an accelerator)
    python benchmarks/muon.py --smoke    # a tiny tree, seconds on CPU
    python benchmarks/muon.py --cost     # no timing: XLA's FLOP and byte counts of each compiled update
    python benchmarks/muon.py --accuracy # Newton–Schulz against the same iteration in float64 (any backend)
    python benchmarks/muon.py --ns-methods=quintic,polar_express,gram   # osp_jax.muon with each method

Prints a table, then one JSON line per optimizer: {"optimizer": ..., "ms": ..., "device": ...}.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

osp_muon = importlib.import_module("osp_jax.muon")  # the module; osp_jax.muon is the function
from osp_jax import compilation_cache  # noqa: E402
from osp_jax.metrics import compiled_cost  # noqa: E402

# Leaves that stay on AdamW in OSP: the embedding, the LM head and the norm scales.
ADAMW_LEAVES = ("embed", "lm_head", "attn_norm", "mlp_norm", "final_norm")


def parameter_shapes(layers: int, dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                     vocab: int) -> dict:
    """The osp_jax.model.Transformer tree (docs/CONTRACTS.md): scanned layers, SSNorm, EmbProj."""
    f32 = jnp.float32

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, f32)

    return {
        "embed": {"embedding": s(vocab, dim)},
        "embed_proj": {"kernel": s(dim, dim)},
        "layers": {
            "attn_norm": {"scale": s(layers)},
            "attn": {
                "q": {"kernel": s(layers, dim, heads, head_dim)},
                "k": {"kernel": s(layers, dim, kv_heads, head_dim)},
                "v": {"kernel": s(layers, dim, kv_heads, head_dim)},
                "o": {"kernel": s(layers, heads, head_dim, dim)},
            },
            "mlp_norm": {"scale": s(layers)},
            "mlp": {"gate": {"kernel": s(layers, dim, ffn)}, "up": {"kernel": s(layers, dim, ffn)},
                    "down": {"kernel": s(layers, ffn, dim)}},
        },
        "final_norm": {"scale": s()},
        "head_proj": {"kernel": s(dim, dim)},
        "lm_head": {"kernel": s(dim, vocab)},
    }


def is_muon_leaf(path) -> bool:
    return not any(getattr(key, "key", None) in ADAMW_LEAVES for key in path)


def labels(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: "muon" if is_muon_leaf(p) else "adamw", tree)


def random_tree(shapes, seed: int, scale: float = 1.0):
    """Random normal arrays of the given shapes, made on the device by one jitted call."""
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(leaves))
        return [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]

    return treedef.unflatten(make(jax.random.key(seed)))


def _supported(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` accepts (optax.contrib.muon gained some across releases); says what it drops."""
    accepted = inspect.signature(fn).parameters
    dropped = sorted(set(kwargs) - set(accepted))
    if dropped:
        print(f"note: optax {optax.__version__} optax.contrib.muon has no {', '.join(dropped)}; left out")
    return {k: v for k, v in kwargs.items() if k in accepted}


def _muon_name(method: str) -> str:
    return "osp_jax.muon" if method == "quintic" else f"osp_jax.muon ({method})"


def optimizers(shapes, lr: float = 1e-3, weight_decay: float = 0.1, methods=("quintic",)) -> dict:
    """The updates compared, each configured as a full training run would use it: osp_jax's Muon with
    each Newton–Schulz method of `methods`, optax.contrib.muon and AdamW."""
    dims = osp_muon.infer_dimension_numbers(shapes)
    contrib_dims = jax.tree_util.tree_map_with_path(lambda p, d: d if is_muon_leaf(p) else None, dims,
                                                    is_leaf=lambda x: x is None or isinstance(
                                                        x, osp_muon.MuonDimensionNumbers))
    adamw = optax.adamw(lr, weight_decay=weight_decay)
    return {
        **{_muon_name(m): optax.multi_transform(
            {"muon": osp_muon.muon(lr, weight_decay=weight_decay, ns_method=m), "adamw": adamw}, labels)
           for m in methods},
        "optax.contrib.muon": optax.contrib.muon(lr, **_supported(optax.contrib.muon, dict(
            weight_decay=weight_decay, adam_weight_decay=weight_decay, consistent_rms=0.2,
            muon_weight_dimension_numbers=contrib_dims))),
        "optax.adamw": adamw,
    }


def time_update(opt, params, grads, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of one jitted update with the state donated."""

    @jax.jit
    def init(p):
        return opt.init(p)

    def step(g, state, p):
        updates, state = opt.update(g, state, p)
        return updates, state

    step = jax.jit(step, donate_argnums=(1,))
    holder = {"state": init(params)}

    def one_update():
        updates, holder["state"] = step(grads, holder["state"], params)  # the donated state moves on
        return updates, holder["state"]

    return _median_ms(one_update, iters, warmup)


def _median_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median wall milliseconds of `fn()` (blocked on its result) over `iters` calls after `warmup`."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def newton_schulz_only(shapes, iters: int, steps: int = 5, method: str = "quintic") -> list[dict]:
    """Newton–Schulz alone on each same-shape group of the Muon matrices (wide orientation), as the
    update stacks them: milliseconds and achieved TFLOP/s (4 m^2 n + 2 m^3 per matrix and step, m <= n:
    the plain iteration's count, which Gram Newton–Schulz beats on wide matrices)."""
    # AdamW's leaves masked out as optax.multi_transform masks them; the views are the (batch, fan_in,
    # fan_out) stacks the update builds, grouped here as it groups them.
    dims = osp_muon.infer_dimension_numbers(shapes)
    muon_shapes = jax.tree_util.tree_map_with_path(
        lambda p, s: s if is_muon_leaf(p) else optax.MaskedNode(), shapes)
    _, _, views = osp_muon._matrix_leaves(muon_shapes, dims)
    groups: dict = {}
    for v in filter(None, views):
        key = (min(v.fan_in, v.fan_out), max(v.fan_in, v.fan_out))
        groups[key] = groups.get(key, 0) + v.batch
    rows = []
    ns = jax.jit(functools.partial(osp_muon.newton_schulz, steps=steps, method=method))
    for (m, n), count in sorted(groups.items()):
        x = random_tree(jax.ShapeDtypeStruct((count, m, n), jnp.float32), seed=2)
        ms = _median_ms(lambda: ns(x), iters)
        flops = count * steps * (4 * m * m * n + 2 * m ** 3)
        rows.append({"shape": [count, m, n], "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                     "method": method})
    return rows


def update_cost(opt, shapes) -> dict:
    """XLA's cost analysis of one compiled update on abstract shapes (nothing is run or allocated):
    FLOPs and bytes accessed, the memory traffic the update's fusions imply on this backend."""
    state = jax.eval_shape(opt.init, shapes)
    compiled = jax.jit(lambda g, s, p: opt.update(g, s, p)).lower(shapes, state, shapes).compile()
    cost = compiled_cost(compiled)
    return {"gflops": round(cost["flops"] / 1e9, 3), "gbytes_accessed": round(cost["bytes accessed"] / 1e9, 3)}


def accuracy(shapes=((256, 256), (256, 704), (704, 256), (512, 1376)), seeds: int = 4) -> list[dict]:
    """Relative Frobenius error of `osp_jax.muon.newton_schulz` (bf16 matmuls, bf16 iterate) against the
    float64 iteration, on Gaussian matrices, mean over `seeds`."""
    rng = np.random.default_rng(0)
    ns = jax.jit(osp_muon.newton_schulz)
    rows = []
    for shape in shapes:
        errs = []
        for _ in range(seeds):
            g = rng.standard_normal(shape).astype(np.float32)
            ref = osp_muon.newton_schulz_reference(g)
            errs.append(float(np.linalg.norm(np.asarray(ns(jnp.asarray(g)), np.float64) - ref) / np.linalg.norm(ref)))
        rows.append({"shape": list(shape), "rel_error": round(statistics.mean(errs), 4)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head_dim", type=int, default=None, help="default: dim // heads")
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny tree (2 layers, dim 64), seconds on CPU")
    parser.add_argument("--accuracy", action="store_true",
                        help="only Newton–Schulz's error against a float64 iteration (any backend, seconds)")
    parser.add_argument("--cost", action="store_true",
                        help="compile only and print XLA's FLOP and byte counts of each update (any backend)")
    parser.add_argument("--compilation-cache-dir", default=compilation_cache.default_dir(),
                        help="JAX's persistent compilation cache ('' = off)")
    parser.add_argument("--ns-methods", default="quintic",
                        help=f"comma-separated Newton–Schulz methods for osp_jax.muon, of {osp_muon.NS_METHODS}")
    args = parser.parse_args(argv)
    compilation_cache.enable(args.compilation_cache_dir)
    methods = tuple(args.ns_methods.split(","))
    if not set(methods) <= set(osp_muon.NS_METHODS):
        raise SystemExit(f"muon: --ns-methods={args.ns_methods}: expected names from {osp_muon.NS_METHODS}")
    if args.accuracy:
        for row in accuracy():
            print(json.dumps({"newton_schulz_rel_error_vs_float64": row, "device": jax.devices()[0].device_kind}))
        return
    if args.smoke:
        args.layers, args.dim, args.heads, args.ffn, args.vocab, args.iters = 2, 64, 4, 176, 512, 10
    kv_heads = args.kv_heads or args.heads
    head_dim = args.head_dim or args.dim // args.heads

    shapes = parameter_shapes(args.layers, args.dim, args.heads, kv_heads, head_dim, args.ffn, args.vocab)
    n_params = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    device = jax.devices()[0].device_kind
    if args.cost:
        print(f"optimizer update, {n_params / 1e6:,.1f}M params, XLA cost analysis on {device} (compiled, not run)")
        for name, opt in optimizers(shapes, methods=methods).items():
            print(json.dumps({"optimizer": name, **update_cost(opt, shapes), "device": device}))
        return
    params = random_tree(shapes, seed=0, scale=0.02)
    grads = random_tree(shapes, seed=1)

    results = {name: time_update(opt, params, grads, args.iters)
               for name, opt in optimizers(shapes, methods=methods).items()}

    print(f"optimizer update, {n_params / 1e6:,.1f}M params ({args.layers} layers, dim {args.dim}), "
          f"{device}, median of {args.iters}")
    print(f"{'optimizer':<30} {'ms':>10} {'x adamw':>8}")
    for name, ms in results.items():
        print(f"{name:<30} {ms:>10.2f} {ms / results['optax.adamw']:>8.2f}")
    for method in methods:
        ns = newton_schulz_only(shapes, args.iters, method=method)
        print(f"Newton–Schulz alone ({method}, 5 steps), per same-shape group:")
        for row in ns:
            print(f"  {row['shape'][0]:>4} x {row['shape'][1]} x {row['shape'][2]:<6} {row['ms']:>9.2f} ms "
                  f"{row['tflops']:>8.1f} TFLOP/s")
        print(f"  total {sum(r['ms'] for r in ns):.2f} ms")
        print(json.dumps({"newton_schulz_only": ns, "device": device}))
    for name, ms in results.items():
        print(json.dumps({"optimizer": name, "ms": round(ms, 3), "device": device}))


if __name__ == "__main__":
    main()
