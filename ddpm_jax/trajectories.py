"""Optimal K-step trajectories: dynamic programming over per-pair KL costs.

Bao et al. 2022 (Analytic-DPM) §4 and Watson et al. 2021: the bound of a sub-chain
0 = s_0 < s_1 < … < s_{K−1} = T−1 (zero-based steps of the full chain) is a sum over
consecutive pairs,

  L = L_T + L_0(s_1) + Σ_{i≥1} KL(s_{i−1}, s_i),

and for σ_t choices computed from the chain and per-step statistics, every pair term
has a closed form in three per-step statistics of the model over the data: Γ_t, the
ε mean squared error M_t = E||ε − ε_θ(x_t, t)||²/d, and the decoder NLL at step 0.
So one Monte Carlo pass over the T steps prices all T(T−1)/2 jumps, and a DP picks
the cheapest K-step path in O(K·T²).

Our chains always keep step 0 (the paper's t = 1), because the bound and the sampler
put the decoder there (`losses.check_bound_inputs`). So there is no "x_t straight to
x_0" row as in Analytic-DPM's code (their F[0, r]): the decoder term is L_0 at step 0
and, under the 'sub_chain' decoder conventions, its σ_1² depends on the trajectory's
second step s_1; it is therefore folded into row 0 of the DP matrix, F[0, t] =
L_0(s_1 = t) + KL(0, t), which prices it exactly for every convention.

Records: a σ record's `variance(chain, stats)` is evaluated on a "pair chain" that
interleaves (ᾱ_s, ᾱ_t) for all pairs, so its value at each odd index is σ² of the
jump t → s. This assumes σ² at a chain step depends only on that step and the one
before it (true of fixed_large, fixed_small, analytic and ddim_eta1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ddpm_jax import diffusion, losses, statistics, variances
from ddpm_jax.schedules import Schedule

Array = jax.Array
LOG2 = float(np.log(2.0))


# --------------------------------------------------------------------------
# Per-step statistics, one pass over t.


# One Monte Carlo pass gives both per-step statistics the pair costs read (statistics.py).
estimate_step_statistics = statistics.estimate_step_statistics
EPS_MSE = statistics.EPS_MSE


# --------------------------------------------------------------------------
# The decoder term at step 0.


def first_step_log_variances(schedule: Schedule, variance, stats: Mapping[str, np.ndarray] | None = None, *,
                             decoder: str | None = None) -> np.ndarray:
    """log σ_1² of the decoder (float32, as the bound uses it) when the trajectory's second step is t, [T].

    Entry t ≥ 1 is `variances.resolve` on the chain [0, t] (the decoder conventions read at most
    the chain's first two steps); entry 0 is the 1-step chain [0]. schedule: the full chain.
    """
    return np.array([variances.resolve(variance, variances.chain(schedule, [0] + ([t] if t else [])), stats,
                                       decoder=decoder, for_bound=True).log_variance[0]
                     for t in range(schedule.num_timesteps)], np.float32)


@functools.partial(jax.jit, static_argnames="mean_type")
def _decoder_terms(model_fn: Partial, schedule: Schedule, x0: Array, rng: Array, log_variances: Array, *,
                   mean_type: str) -> Array:
    """L_0 = −log p(x_0|x_1)/d in bits (Ho eq. 13, mean x̂_0) for each log σ_1² of `log_variances` [V] -> [V, B]."""
    t = jnp.zeros(x0.shape[:1], jnp.int32)
    x_1 = diffusion.q_sample(schedule, x0, t, jax.random.normal(rng, x0.shape, x0.dtype))
    pred_x0, _ = diffusion.predict_x0_eps(schedule, x_1, t, model_fn(x_1, t), mean_type)
    # At step 0, μ̃(x̂_0, x_1) = x̂_0 (posterior_mean_coef1 = 1, coef2 = 0).
    mean, _, _ = diffusion.q_posterior(schedule, pred_x0, x_1, t)

    def nll(log_variance):
        return -losses.mean_flat(losses.discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / LOG2

    return jax.lax.map(nll, log_variances)


def estimate_decoder_nll(model_fn, schedule: Schedule, data: np.ndarray, rng: Array, log_variances: np.ndarray, *,
                         batch_size: int = 256, mean_type: str = "eps") -> np.ndarray:
    """E_{q(x_0) q(x_1|x_0)} −log p(x_0|x_1)/d in bits for each log σ_1² of `log_variances` [V] -> float64 [V].

    Every value sees the same x_1 draws; the network runs once per example, the discretized
    likelihood once per distinct value.
    """
    unique, inverse = np.unique(np.asarray(log_variances, np.float32), return_inverse=True)
    batch_size = min(batch_size, data.shape[0])
    model_fn = statistics.mean_output_fn(model_fn)
    total = np.zeros(len(unique))
    for index, (batch, count) in enumerate(statistics.padded_batches(data, batch_size)):
        out = _decoder_terms(model_fn, schedule, jnp.asarray(batch), jax.random.fold_in(rng, index),
                             jnp.asarray(unique), mean_type=mean_type)
        total += np.asarray(out, np.float64)[:, :count].sum(axis=1)
    return (total / data.shape[0])[inverse.reshape(-1)]


# --------------------------------------------------------------------------
# The cost matrix (host, float64).


def full_chain(schedule: Schedule) -> variances.Chain:
    """The full chain with the ᾱ every sub-chain's bound uses (`variances.chain(schedule, kept)`)."""
    return variances.chain(schedule, np.arange(schedule.num_timesteps))


def pair_chain(full: variances.Chain) -> tuple[variances.Chain, np.ndarray, np.ndarray]:
    """(chain, s, t): a Chain interleaving (ᾱ_s, ᾱ_t) for every pair s < t (np.triu_indices order), so at
    each odd index its ᾱ_{t−1} is ᾱ_s: every per-step array read there is that of the jump t → s."""
    s, t = np.triu_indices(full.num_steps, k=1)
    ac = full.alphas_cumprod
    timesteps = np.stack([full.timesteps[s], full.timesteps[t]], axis=1).ravel()
    return variances.Chain(timesteps, np.stack([ac[s], ac[t]], axis=1).ravel(), full.full_beta_tilde_2), s, t


def pair_kl(pair: variances.Chain, sigma2: np.ndarray, eps_mse: np.ndarray) -> np.ndarray:
    """E_q KL(q(x_s|x_t, x_0) ‖ N(μ_θ, σ²)) per dimension, in bits, at each odd index of `pair` (jump t → s).

    Ho eq. 7 on the respaced pair, β' = 1 − ᾱ_t/ᾱ_s, λ² = β̃' = β'(1 − ᾱ_s)/(1 − ᾱ_t); the mean error is
    μ̃(x_0) − μ̃(x̂_0) = c (ε_θ − ε) with c² = ᾱ_s β'²/(ᾱ_t (1 − ᾱ_t)) (from x_0 − x̂_0 = √((1 − ᾱ_t)/ᾱ_t)(ε_θ − ε)),
    so KL = ½(λ²/σ² − 1 + log(σ²/λ²)) + c² M_t/(2σ²) (Analytic-DPM's code, elbo.py `get_nelbo_terms`).
    sigma2, eps_mse: [P] at the pairs.
    """
    lam2 = pair.posterior_variance[1::2]
    c2 = pair.posterior_mean_coef1[1::2] ** 2 * (1.0 - pair.alphas_cumprod[1::2]) / pair.alphas_cumprod[1::2]
    ratio = lam2 / sigma2
    return (0.5 * (ratio - 1.0 - np.log(ratio)) + c2 * eps_mse / (2.0 * sigma2)) / LOG2


@dataclasses.dataclass(frozen=True)
class PairCosts:
    """The bound of every trajectory of one σ choice, in bits/dim (summed as `losses.bound_terms`).

    kl [T, T]: kl[s, t] the KL term of the jump t → s (s < t), +inf elsewhere.
    decoder [T]: L_0 at step 0 when the trajectory's second step is t (decoder[0]: the 1-step chain).
    prior: L_T at step T−1, the same for every trajectory.
    """

    kl: np.ndarray
    decoder: np.ndarray
    prior: float

    @property
    def matrix(self) -> np.ndarray:
        """F [T, T] for `optimal_steps`: kl with the decoder folded into row 0, F[0, t] = L_0(t) + kl[0, t]."""
        F = self.kl.copy()
        F[0] += self.decoder
        return F

    def total(self, steps: Sequence[int]) -> float:
        """The bound (bits/dim) of the trajectory `steps` (zero-based, from 0 to T−1)."""
        steps = np.asarray(steps)
        if len(steps) == 1:
            return float(self.prior + self.decoder[0])
        return float(self.prior + trajectory_cost(self.matrix, steps))

    def terms(self, steps: Sequence[int]) -> np.ndarray:
        """The per-step terms [K] as `nll_bpd_by_variance` reports them: L_0, then the KL of each jump."""
        steps = np.asarray(steps)
        decoder = self.decoder[steps[1] if len(steps) > 1 else 0]
        return np.concatenate([[decoder], self.kl[steps[:-1], steps[1:]]])


def check_record(variance) -> variances.Variance:
    """The record, after checking that its pair costs have a closed form (host σ², a Gaussian bound)."""
    record = variances.get(variance)
    variances.check(record)
    if record.from_network:
        raise ValueError(f"variance {record.name!r}: σ² comes from the network, so its pair costs need a network call "
                         "per pair; optimal trajectories support host-computed σ² only")
    losses.check_has_bound(record)
    return record


def pair_costs(full: variances.Chain, stats: Mapping[str, np.ndarray], variance, decoder_nll: np.ndarray,
               prior: float = 0.0) -> PairCosts:
    """The cost matrix of σ choice `variance` from per-step statistics, float64 (host only, no network call).

    full: `full_chain(schedule)`. stats: {'eps_mse': [T], and what the record needs, e.g. 'gamma'} over
    the full chain. decoder_nll [T]: `estimate_decoder_nll` at `first_step_log_variances`.
    prior: L_T in bits/dim (its mean over data; it does not change the optimal trajectory).
    """
    record = check_record(variance)
    pair, _, t = pair_chain(full)
    own = {s.name: statistics.at_steps(s.name, stats[s.name], pair.timesteps) for s in record.needs}
    with np.errstate(all="ignore"):  # even indices of the pair chain are not pairs; never read
        sigma2 = np.asarray(record.variance(pair, own), np.float64)[1::2]
    eps_mse = statistics.at_steps("eps_mse", stats["eps_mse"], full.timesteps)[t]
    num_steps = full.num_steps
    kl = np.full((num_steps, num_steps), np.inf)
    kl[np.triu_indices(num_steps, k=1)] = pair_kl(pair, sigma2, eps_mse)
    return PairCosts(kl, np.asarray(decoder_nll, np.float64), float(prior))


def estimate_pair_costs(model_fn, schedule: Schedule, data: np.ndarray, rng: Array, variance, *,
                        stats: Mapping[str, np.ndarray] | None = None, decoder: str | None = None,
                        batch_size: int = 256, mean_type: str = "eps") -> tuple[PairCosts, dict[str, np.ndarray]]:
    """(PairCosts, stats) of one σ choice for a model over training `data` [M, ...] in [−1, 1].

    stats: cached {'gamma', 'eps_mse'} [T] (estimated here in one pass when either is missing,
    with fold_in(rng, 0)); the decoder NLL uses fold_in(rng, 1). schedule: the full chain.
    """
    record = check_record(variance)
    stats = dict(stats or {})
    if any(name not in stats for name in ("gamma", "eps_mse")):
        stats.update(estimate_step_statistics(model_fn, schedule, data, jax.random.fold_in(rng, 0),
                                              batch_size=batch_size, mean_type=mean_type))
    log_variances = first_step_log_variances(schedule, record, stats, decoder=decoder)
    decoder_nll = estimate_decoder_nll(model_fn, schedule, data, jax.random.fold_in(rng, 1), log_variances,
                                       batch_size=batch_size, mean_type=mean_type)
    prior = sum(float(np.asarray(losses.prior_bpd(schedule, jnp.asarray(batch)), np.float64)[:count].sum())
                for batch, count in statistics.padded_batches(data, min(batch_size, data.shape[0]))) / data.shape[0]
    return pair_costs(full_chain(schedule), stats, record, decoder_nll, prior), stats


# --------------------------------------------------------------------------
# The dynamic programme.


def optimal_steps(F: np.ndarray, num_steps: int) -> np.ndarray:
    """The K = num_steps increasing zero-based steps from 0 to T−1 minimising Σ_i F[s_{i−1}, s_i], int64 [K].

    Bao et al. 2022 §4 (Watson et al. 2021): C[k, t] = min_s C[k−1, s] + F[s, t], the cheapest
    k-step path from 0 to t; O(K·T²) in vectorised NumPy. F [T, T]: finite for s < t (`PairCosts.matrix`).
    """
    F = np.asarray(F, np.float64)
    num_timesteps = F.shape[0]
    if F.ndim != 2 or F.shape[1] != num_timesteps:
        raise ValueError(f"F must be a square [T, T] cost matrix, got shape {F.shape}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not (
            2 <= num_steps <= num_timesteps or num_steps == num_timesteps == 1):
        raise ValueError(f"num_steps must be an integer in [2, T = {num_timesteps}], got {num_steps!r}")
    cost = np.full(num_timesteps, np.inf)
    cost[0] = 0.0
    parents = np.zeros((num_steps, num_timesteps), np.int64)
    for k in range(1, num_steps):
        candidates = cost[:, None] + F
        parents[k] = np.argmin(candidates, axis=0)
        cost = candidates[parents[k], np.arange(num_timesteps)]
    steps = [num_timesteps - 1]
    for k in range(num_steps - 1, 0, -1):
        steps.append(parents[k, steps[-1]])
    return np.asarray(steps[::-1], np.int64)


def trajectory_cost(F: np.ndarray, steps: Sequence[int]) -> float:
    """Σ_i F[s_{i−1}, s_i] along `steps`."""
    steps = np.asarray(steps)
    return float(np.sum(np.asarray(F)[steps[:-1], steps[1:]]))
