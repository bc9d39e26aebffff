"""Newton–Schulz iterations: a matrix's orthogonal polar factor `U V^T` from matmuls alone.

Three methods (`NS_METHODS`), each a composition of odd quintics `p(s) = a s + b s^3 + c s^5` applied
to the singular values of `x / ||x||_F`:
  quintic        the OSP paper's (Keller Jordan's) fixed (3.4445, -4.7750, 2.0315): fast to ~0.7-1.2,
                 never converges. The default, exactly as before.
  polar_express  Amsel, Persson, Musco & Gower (arXiv 2505.16932), Algorithm 1: per-step coefficients,
                 each the minimax-optimal quintic for the interval the previous steps leave, with their
                 1.01 safety factor; converges.
  gram           Gram Newton–Schulz (Zhang, Amsel, Chen & Dao, Dao-AILab 2026): the same polynomials
                 evaluated on the small Gram matrix `R = x x^T` (`x <- P x` means `R <- P R P`), so a
                 wide (m, n) matrix costs (m, m) matmuls except at the start, one restart and the end.
                 Polar Express coefficients at their 1.05 safety factor, restart after step 2, as in
                 Dao-AILab's reference; a square matrix saves nothing there and runs the plain iteration.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # guards the normalisation of an all-zero matrix
NS_METHODS = ("quintic", "polar_express", "gram")

# Polar Express, Algorithm 1 of arXiv 2505.16932 (as published, before its safety factor): step t's
# optimal quintic; steps past the table repeat the last row, which is numerically where they converge.
POLAR_EXPRESS_COEFFS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01  # the paper's: p(s / 1.01) for every row but the last, and x / (1.01 ||x||_F)
GRAM_SAFETY = 1.05  # Dao-AILab's for Gram Newton–Schulz, every row; x / ||x||_F
GRAM_RESTARTS = (2,)  # steps before which the Gram iteration restarts from x (Dao-AILab's default)


def _scaled(row, safety: float) -> tuple[float, float, float]:
    """The coefficients of `p(s / safety)`."""
    a, b, c = row
    return a / safety, b / safety**3, c / safety**5


def polar_express_coeffs(steps: int, safety: float = POLAR_EXPRESS_SAFETY, all_rows: bool = False,
                         normalization: float | None = None) -> list[tuple[float, float, float]]:
    """`steps` rows of the Polar Express table (the last repeated past its end) with the safety factor:
    the paper's on every row but the table's last (`all_rows=False`), or Dao-AILab's on every row.
    `normalization` folds the paper's `x / (c ||x||_F)` into the first step, for an input already
    divided by `||x||_F`."""
    table = [POLAR_EXPRESS_COEFFS[min(t, len(POLAR_EXPRESS_COEFFS) - 1)] for t in range(steps)]
    last = len(POLAR_EXPRESS_COEFFS) - 1
    rows = [row if (t >= last and not all_rows) else _scaled(row, safety) for t, row in enumerate(table)]
    if normalization and rows:
        rows[0] = _scaled(rows[0], normalization)
    return rows


def method_coeffs(method: str, steps: int, coeffs=None):
    """The (a, b, c) schedule a method runs for `steps` steps on an input already divided by
    `||x||_F`: `coeffs` (one triple or `steps` of them) for `quintic`, the published tables else."""
    if method not in NS_METHODS:
        raise ValueError(f"Newton–Schulz method {method!r}: expected one of {', '.join(NS_METHODS)}.")
    if method == "quintic":
        return DEFAULT_NS_COEFFS if coeffs is None else coeffs
    if coeffs is not None:
        raise ValueError(f"Newton–Schulz method {method!r} has its own coefficients; ns_coeffs is for "
                         f"method 'quintic' (got {coeffs!r}).")
    if method == "polar_express":
        return polar_express_coeffs(steps, normalization=POLAR_EXPRESS_SAFETY)
    return polar_express_coeffs(steps, safety=GRAM_SAFETY, all_rows=True)


def _bf16_matmul(a: jax.Array, b: jax.Array, out=jnp.float32) -> jax.Array:
    """bfloat16 operands, float32 accumulation (tensor-core speed without losing the sum); the result
    is rounded to `out` as the matmul writes it."""
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=out)


def _quintic_step(x: jax.Array, a, b, c) -> jax.Array:
    """One step `x <- a x + b (x x^T) x + c (x x^T)^2 x` on a wide (m, n) matrix (or a stack of them),
    computed as `(a I + b G + c G^2) x` with `G = x x^T`.

    Only (m, m) work happens outside the matmuls: folding `a x` into the small polynomial lets the
    last, largest matmul write the next bfloat16 iterate directly, instead of writing (m, n) float32
    sums that an element-wise pass re-reads with `x` to add `a x` and round. Sums stay float32 inside
    each matmul. The iterate is stored in bfloat16 between steps: keeping it in float32 made the 1.4B
    train step need 13 GiB more temporaries (XLA's estimate), which put OSP's peak memory above
    AdamW's; the iteration is self-correcting, so the rounding does not accumulate.
    """
    m = x.shape[-2]
    gram = _bf16_matmul(x, jnp.swapaxes(x, -1, -2))  # (..., m, m): the smaller side, as x is wide
    poly = b * gram + c * _bf16_matmul(gram, gram) + a * jnp.eye(m, dtype=jnp.float32)
    return _bf16_matmul(poly, x, out=jnp.bfloat16)


def _gram_iteration(x: jax.Array, schedule, restarts=GRAM_RESTARTS) -> jax.Array:
    """Gram Newton–Schulz on a wide bfloat16 (m, n) stack: the steps of `schedule` on `R = x x^T`.

    A step multiplies x by `P = a I + b R + c R^2` (symmetric, commuting with R), so it is tracked as
    `Q <- Q P` and `R <- P R P` without touching x, and x is formed once, `Q x`, at the end. R is no
    longer recomputed from x, so rounding accumulates in it: before each step in `restarts` the
    iteration restarts, `x <- Q x`, `R <- x x^T`. The (m, m) iterates are kept in float32; a bfloat16
    R (8 mantissa bits, against the reference's float16 with 11) loses its smallest eigenvalues,
    which are the squares of the smallest singular values.
    """
    def mm(u, v):  # float32: the Gram iterates square the singular values' range
        return jnp.matmul(u, v, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    eye = jnp.eye(x.shape[-2], dtype=jnp.float32)
    gram, q = _bf16_matmul(x, jnp.swapaxes(x, -1, -2)), None
    for t, (a, b, c) in enumerate(schedule):
        if t in restarts and q is not None:
            x = _bf16_matmul(q, x, out=jnp.bfloat16)
            gram, q = _bf16_matmul(x, jnp.swapaxes(x, -1, -2)), None
        z = b * gram + c * mm(gram, gram)
        q = z + a * eye if q is None else mm(q, z) + a * q
        if t + 1 < len(schedule) and t + 1 not in restarts:  # R is needed by a next step
            rz = mm(gram, z) + a * gram
            gram = mm(z, rz) + a * rz
    return x if q is None else _bf16_matmul(q, x, out=jnp.bfloat16)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / ||x||_F` per matrix, computed in float32, stored in bfloat16: Newton–Schulz's first iterate.

    The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1]."""
    x = x.astype(jnp.float32)
    return (x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)).astype(jnp.bfloat16)


def _coefficient_schedule(coeffs, steps: int) -> list[tuple[float, float, float]]:
    """`steps` (a, b, c) triples, from one triple or from a per-step schedule."""
    table = np.asarray(coeffs, dtype=np.float64)
    if table.shape == (3,):
        return [tuple(table.tolist())] * steps
    if table.shape == (steps, 3):
        return [tuple(row) for row in table.tolist()]
    raise ValueError(f"newton_schulz: coeffs must be one (a, b, c) triple or {steps} triples (one per "
                     f"step), got an array of shape {table.shape}.")


def _rolled(x: jax.Array, steps, method: str, coeffs) -> jax.Array:
    """The iteration for a traced step count (as under `optax.inject_hyperparams`): a `fori_loop`."""
    if method == "quintic":
        if np.shape(coeffs) != (3,):
            raise ValueError("newton_schulz: a per-step coefficient schedule needs a static `steps`, "
                             f"got {steps!r}.") from None
        a, b, c = coeffs
        return jax.lax.fori_loop(0, steps, lambda _, y: _quintic_step(y, a, b, c), x)
    if method == "polar_express":  # step t takes row min(t, last) of the table, as a static run does
        table = jnp.asarray(polar_express_coeffs(len(POLAR_EXPRESS_COEFFS)), jnp.float32)
        first = jnp.asarray(polar_express_coeffs(1, normalization=POLAR_EXPRESS_SAFETY)[0], jnp.float32)
        table = table.at[0].set(first)
        return jax.lax.fori_loop(
            0, steps, lambda t, y: _quintic_step(y, *table[jnp.minimum(t, len(table) - 1)]), x)
    raise ValueError(f"newton_schulz: method {method!r} needs a static `steps` (its restarts are placed "
                     f"by step), got {steps!r}; under optax.inject_hyperparams pass "
                     "static_args=('ns_steps',).")


def newton_schulz(x: jax.Array, steps: int = 5, coeffs=None, eps: float = NS_EPS,
                  normalize: bool = True, method: str = "quintic") -> jax.Array:
    """Approximately orthogonalises `x` (`U S V^T -> U V^T`) by a quintic Newton–Schulz iteration.

    With the default method and coefficients (Keller Jordan's), small singular values rise fast
    instead of converging exactly: outputs have singular values of roughly 0.7 to 1.2, which trains as
    well as the exact polar factor at a fraction of the cost of an SVD. `polar_express` and `gram`
    converge (module docstring).

    Args:
        x: a matrix, or a stack of matrices with leading batch axes (each orthogonalised alone).
        steps: number of iterations. May be a traced scalar (as under `optax.inject_hyperparams`);
            the loop is then a `fori_loop` (methods `quintic`, with a single triple, and
            `polar_express`).
        coeffs: for method `quintic`: one `(a, b, c)` triple for every step, or a sequence of `steps`
            triples; None is `DEFAULT_NS_COEFFS`. The other methods have their own.
        eps: guards the normalisation of an all-zero matrix (which stays zero).
        normalize: False when `x` is already each matrix divided by its Frobenius norm (as
            `scale_by_muon` does before stacking, in bfloat16, to move half the bytes).
        method: one of `NS_METHODS`.

    Returns:
        An array of the shape and dtype of `x`.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz: expected a matrix or a stack of matrices, got shape {x.shape}.")
    dtype = x.dtype
    # The iteration only needs the smaller Gram matrix: run on the wide orientation, flip back after.
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = _normalize(x, eps) if normalize else x.astype(jnp.bfloat16)

    try:
        steps = operator.index(steps)
    except TypeError:  # a traced step count: the same iteration, rolled
        x = _rolled(x, steps, method, DEFAULT_NS_COEFFS if coeffs is None else coeffs)
    else:
        schedule = _coefficient_schedule(method_coeffs(method, steps, coeffs), steps)
        if method == "gram" and x.shape[-2] < x.shape[-1]:
            x = _gram_iteration(x, schedule)
        else:
            for a, b, c in schedule:
                x = _quintic_step(x, a, b, c)

    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(dtype)


def newton_schulz_reference(x, steps: int = 5, coeffs=DEFAULT_NS_COEFFS, method: str = "quintic") -> np.ndarray:
    """The same iteration in float64 NumPy, as the papers write it (`x <- a x + b (x x^T) x +
    c (x x^T)^2 x`, from `x / ||x||_F`, on the wide orientation): the reference that tests and
    `benchmarks/muon.py --accuracy` hold `newton_schulz` to. One matrix. For `quintic`, one (a, b, c)
    triple; `polar_express` is the paper's Algorithm 1 (`x / (1.01 ||x||_F)`); `gram` is the plain
    iteration with Gram Newton–Schulz's coefficients, to which it is equal in exact arithmetic."""
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / np.linalg.norm(x)
    if method == "quintic":
        schedule = [tuple(coeffs)] * steps
    elif method == "polar_express":
        x = x / POLAR_EXPRESS_SAFETY
        schedule = polar_express_coeffs(steps)
    else:
        schedule = method_coeffs(method, steps)
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


__all__ = [
    "DEFAULT_NS_COEFFS",
    "GRAM_RESTARTS",
    "NS_EPS",
    "NS_METHODS",
    "POLAR_EXPRESS_COEFFS",
    "method_coeffs",
    "newton_schulz",
    "newton_schulz_reference",
    "polar_express_coeffs",
]
