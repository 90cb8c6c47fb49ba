"""The reverse-process variance σ_t² as data: one `Variance` record per choice.

A record says how to compute log σ_t² on any (sub-)chain, on the host in
float64, from the chain (`Chain`) and the statistics it `needs`; or that the
network outputs it (`network`). `resolve` turns a record into a `Resolved`
choice on one chain: a float32 [K] array (or the network function) and the
decoder-step and DDIM settings. The sampler, the bound and the ablation take
that and never test a name. A researcher's own σ_t is one more record, defined
anywhere (see README, "Your own σ_t"); a σ_t that needs a data statistic is a
record plus a `statistics.Statistic` with its estimator.

Decoder step (t = 1, our index 0), where β̃_1 = 0 and each codebase picks a
value; `DECODERS`:
  'full_chain'       σ_1² = β̃_2 of the full T-step chain, on every sub-chain
                     (Bao et al. 2022's code, elbo.py `_sigma2_small(1, 2)`;
                     Ho et al.'s code on the full chain).
  'sub_chain'        σ_1² = β̃ at the sub-chain's second step (improved-diffusion
                     on a respaced chain; equal to 'full_chain' when K = T).
  'floor_sub_chain'  σ_1² = max(own σ_1², 'sub_chain' value): this codebase's
                     analytic σ before 2026-12.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import pathlib
from typing import Callable, Mapping

import jax
import numpy as np

from ddpm_jax import statistics
from ddpm_jax.diffusion import extract
from ddpm_jax.schedules import Schedule, alphas_cumprod_f64, floor_terminal, respaced_alphas_cumprod

Array = jax.Array


# --------------------------------------------------------------------------
# The chain on the host, float64.


@dataclasses.dataclass(frozen=True)
class Chain:
    """A (sub-)chain of K steps in float64 NumPy: ᾱ at its steps and the full chain's β̃_2.

    Every derived array uses the expressions of `schedules.schedule_from_alphas_cumprod`, in the
    same order, so a float32 cast of any of them equals the Schedule's stored field.
    """

    timesteps: np.ndarray  # int64 [K]: the full chain's step each step stands for
    alphas_cumprod: np.ndarray  # ᾱ [K]
    full_beta_tilde_2: float | None  # β̃_2 of the full T-step chain; None: unknown

    @property
    def num_steps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def alphas(self) -> np.ndarray:
        return self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def betas(self) -> np.ndarray:
        """Ho eq. 4 on the chain: β_t = 1 − ᾱ_t/ᾱ_{t−1} (Nichol & Dhariwal §4 for a sub-chain)."""
        return 1.0 - self.alphas

    @property
    def posterior_variance(self) -> np.ndarray:
        """Ho eq. 7 / seed eq. 5: β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t; β̃_1 = 0."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Ho eq. 7: the x_0 coefficient of μ̃_t, √ᾱ_{t−1} β_t/(1 − ᾱ_t)."""
        return np.sqrt(self.alphas_cumprod_prev) * self.betas / (1.0 - self.alphas_cumprod)

    @property
    def sub_beta_tilde_2(self) -> float:
        """β̃ at the chain's second step (β_1 for a 1-step chain): improved-diffusion's clipped log β̃_1."""
        return float(self.posterior_variance[1] if self.num_steps > 1 else self.betas[0])


def _beta_tilde_2(alphas_cumprod: np.ndarray) -> float:
    ac1, ac2 = alphas_cumprod[0], alphas_cumprod[1]
    return float((1.0 - ac2 / ac1) * (1.0 - ac1) / (1.0 - ac2))


def chain(schedule: Schedule, kept: np.ndarray | None = None) -> Chain:
    """The float64 Chain of `schedule`, or of its sub-chain `schedules.respace(schedule, kept)`.

    The full chain's β̃_2 (for the 'full_chain' decoder convention) is known when `schedule`
    keeps steps 0 and 1 (a full chain does). Host only: `schedule` must be concrete, not traced.
    """
    timesteps = np.asarray(schedule.timesteps, np.int64)
    own = alphas_cumprod_f64(schedule)
    knows_first_two = timesteps[0] == 0 and len(timesteps) > 1 and timesteps[1] == 1
    # A 1-step schedule alone cannot tell a T = 1 chain from a respaced one: no β̃_2 (decoder='full_chain' raises).
    beta_tilde_2 = _beta_tilde_2(own[:2]) if knows_first_two else None
    if kept is None or len(kept) == len(timesteps):  # every step kept: the chain itself, as the sampler runs it
        return Chain(timesteps, own, beta_tilde_2)
    kept = np.asarray(kept)
    return Chain(timesteps[kept], floor_terminal(respaced_alphas_cumprod(schedule, kept)), beta_tilde_2)


# --------------------------------------------------------------------------
# Decoder-step conventions.


def _full_chain(sigma2: np.ndarray, c: Chain) -> np.ndarray:
    if c.full_beta_tilde_2 is None:
        raise ValueError("decoder='full_chain' needs the full chain's β̃_2: pass the full T-step schedule and "
                         "num_steps/steps (or chain(full, kept)), not a respaced schedule alone")
    return np.concatenate([[c.full_beta_tilde_2], sigma2[1:]])


def _sub_chain(sigma2: np.ndarray, c: Chain) -> np.ndarray:
    return np.concatenate([[c.sub_beta_tilde_2], sigma2[1:]])


def _floor_sub_chain(sigma2: np.ndarray, c: Chain) -> np.ndarray:
    return np.concatenate([[max(sigma2[0], c.sub_beta_tilde_2)], sigma2[1:]])


DECODERS: dict[str, Callable[[np.ndarray, Chain], np.ndarray]] = {
    "full_chain": _full_chain,
    "sub_chain": _sub_chain,
    "floor_sub_chain": _floor_sub_chain,
}


# --------------------------------------------------------------------------
# The record.

# log_variance(chain, stats) -> σ² [K] float64 (the record's own value at t = 1 may be anything:
# the decoder convention replaces or floors it). stats: {Statistic.name: float64 [K] at chain.timesteps}.
VarianceFn = Callable[[Chain, Mapping[str, np.ndarray]], np.ndarray]
# network(schedule, var_output, t) -> log σ² shaped like var_output (the network's extra C channels).
NetworkFn = Callable[[Schedule, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class Variance:
    """One σ_t choice. Exactly one of `variance` (host float64) and `network` is set."""

    name: str  # the row label in tables, plots and file names
    variance: VarianceFn | None = None
    network: NetworkFn | None = None
    needs: tuple[statistics.Statistic, ...] = ()  # statistics the variance function reads, with their estimators
    decoder: str = "sub_chain"  # default decoder-step convention (a key of DECODERS)
    ddim_eta: float | None = None  # DDIM (Song et al. 2021, eq. 12) with σ(η) instead of ancestral sampling
    has_bound: bool = True  # False: this reverse process has no bound (bound_note says why); DDIM's is ddim_bound's
    bound_note: str = ""  # what the bound is, or why there is none
    source: str = ""  # the paper and equation

    @property
    def from_network(self) -> bool:
        return self.network is not None


def model_channels(data_channels: int, from_network: bool) -> int:
    """The one C-vs-2C rule: a network that outputs σ² has 2C output channels, else C (N&D §3.1)."""
    return data_channels * (2 if from_network else 1)


def _fixed_large(c: Chain, stats) -> np.ndarray:
    return c.betas


def _fixed_small(c: Chain, stats) -> np.ndarray:
    return c.posterior_variance


def analytic_variance(c: Chain, gamma: np.ndarray) -> np.ndarray:
    """Bao et al. 2022, Thm. 1 with λ_t² = β̃_t (the DDPM chain), clipped to Thm. 2's bounds, float64 [K]:

    σ*_t² = λ_t² + (√((1 − ᾱ_t)/α_t) − √(1 − ᾱ_{t−1} − λ_t²))² (1 − Γ_t), Γ clipped to [0, 1].
    With λ_t² = β̃_t the squared gap is β_t²/(α_t(1 − ᾱ_t)) (no cancellation at small t); the
    bounds for data in [−1, 1] are λ_t² and λ_t² + c_t², c_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t).
    """
    lam2 = c.posterior_variance
    gap2 = c.betas**2 / (c.alphas * (1.0 - c.alphas_cumprod))
    sigma2 = lam2 + gap2 * (1.0 - np.clip(gamma, 0.0, 1.0))
    return np.clip(sigma2, lam2, lam2 + c.posterior_mean_coef1**2)


def _analytic(c: Chain, stats) -> np.ndarray:
    return analytic_variance(c, stats["gamma"])


def _learned(schedule: Schedule, var_output: Array, t: Array) -> Array:
    """The network outputs log σ_t² directly (Ho et al. 2020, §4.2 ablation)."""
    return var_output


def _learned_range(schedule: Schedule, var_output: Array, t: Array) -> Array:
    """N&D eq. 15: log σ_t² = v log β_t + (1 − v) log β̃_t, the output in [−1, 1] mapped to v ∈ [0, 1]."""
    min_log = extract(schedule.posterior_log_variance_clipped, t, var_output.shape)
    max_log = extract(schedule.log_betas, t, var_output.shape)
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


FIXED_LARGE = Variance("fixed_large", _fixed_large, source="Ho et al. 2020 §3.2: σ_t² = β_t")
FIXED_SMALL = Variance("fixed_small", _fixed_small, source="Ho et al. 2020 §3.2, seed eq. 5: σ_t² = β̃_t")
LEARNED = Variance("learned", network=_learned, source="Ho et al. 2020 §4.2: σ_t² = exp(network output)")
LEARNED_RANGE = Variance("learned_range", network=_learned_range, source="Nichol & Dhariwal 2021 eq. 15")
ANALYTIC = Variance("analytic", _analytic, needs=(statistics.GAMMA,), decoder="full_chain",
                    source="Bao et al. 2022, Thm. 1–2 (Analytic-DPM)")

VARIANCES: dict[str, Variance] = {v.name: v for v in (FIXED_LARGE, FIXED_SMALL, LEARNED, LEARNED_RANGE, ANALYTIC)}


def ddim(eta: float) -> Variance:
    """Song et al. 2021, eq. 16: σ_t(η)² = η² β̃_t on the (sub-)chain, with DDIM's mean (eq. 12)."""
    eta = float(eta)
    if eta == 0.0:
        note = "DDIM η=0 is deterministic given x_T: p(x_{t−1}|x_t) is a point mass, no bound exists"
    elif eta == 1.0:
        note = "DDIM η=1 is ancestral sampling with σ²=β̃ (Song et al. eq. 16): its bound equals fixed_small's"
    else:
        note = ("DDIM's bound with its non-Markovian posterior q_σ (Song et al. eqs. 7–8, ddpm_jax.ddim_bound); "
                "it grows as 1/η² for η→0")
    return Variance(f"ddim_eta{eta:g}", functools.partial(_ddim_variance, eta), ddim_eta=eta,
                    has_bound=eta > 0.0, bound_note=note, source="Song et al. 2021, eqs. 12 and 16")


def _ddim_variance(eta: float, c: Chain, stats) -> np.ndarray:
    return eta**2 * c.posterior_variance


# --------------------------------------------------------------------------
# Looking a choice up, and resolving it on a chain.


def _load_attribute(spec: str):
    """'package.module:NAME' or 'path/to/file.py:NAME' -> the object."""
    where, _, attribute = spec.rpartition(":")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise ValueError(f"variance {spec!r}: no file {where}")
        module_spec = importlib.util.spec_from_file_location(f"ddpm_jax_user_variance_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"variance {spec!r}: cannot import {where!r} ({err})") from None
    if not hasattr(module, attribute):
        raise ValueError(f"variance {spec!r}: {where} has no attribute {attribute!r}")
    return getattr(module, attribute)


def get(spec: str | Variance) -> Variance:
    """A record from a Variance, a built-in name (`VARIANCES`), 'ddim_eta<η>', or 'module:NAME' / 'file.py:NAME'."""
    if isinstance(spec, Variance):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"variance must be a ddpm_jax.variances.Variance or a name, one of {sorted(VARIANCES)}, "
                         f"'ddim_eta<η>' or 'module:NAME', got {spec!r}")
    if spec in VARIANCES:
        return VARIANCES[spec]
    if spec.startswith("ddim_eta"):
        try:
            eta = float(spec[len("ddim_eta"):])
        except ValueError:
            eta = math.nan
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"variance {spec!r}: DDIM's η must be a float in [0, 1]")
        return ddim(eta)
    if ":" in spec:
        record = _load_attribute(spec)
        if not isinstance(record, Variance):
            raise ValueError(f"variance {spec!r} must name a ddpm_jax.variances.Variance, got {type(record).__name__}")
        return record
    raise ValueError(f"variance must be one of {sorted(VARIANCES)}, 'ddim_eta<η>', a Variance record or "
                     f"'module:NAME', got {spec!r}")


def check(record: Variance) -> None:
    """A record that a user defined: exactly one of variance/network, a known decoder convention."""
    if (record.variance is None) == (record.network is None):
        raise ValueError(f"Variance {record.name!r} must set exactly one of variance= and network=")
    if record.decoder not in DECODERS:
        raise ValueError(f"Variance {record.name!r}: decoder must be one of {sorted(DECODERS)}, got {record.decoder!r}")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A σ_t choice on one chain: what the sampler and the bound read.

    variance, log_variance: float32 [K] (None when the network outputs σ²); network: the record's
    network function; ddim_eta: DDIM's η or None (ancestral).
    """

    record: Variance
    variance: np.ndarray | None
    log_variance: np.ndarray | None
    decoder: str | None

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def network(self) -> NetworkFn | None:
        return self.record.network

    @property
    def ddim_eta(self) -> float | None:
        return self.record.ddim_eta


def sigma_clip_threshold(pixel: float) -> float:
    """Bao et al.'s code (reverse_ddpm.py): σ² ≤ (pixel · 2/255 · √(π/2))², E|σz| at most `pixel` 8-bit levels."""
    return (pixel * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2


def clip_last_steps(sigma2: np.ndarray, num_steps: int, pixel: float) -> np.ndarray:
    """Analytic-DPM's sampler clips σ² of the last `num_steps` noisy steps (indices 1..num_steps; index 0 adds
    no noise) to `sigma_clip_threshold(pixel)`; its released runs use num_steps = 1 (clip_sigma_idx = 1)."""
    out = np.array(sigma2, np.float64)
    out[1 : num_steps + 1] = np.minimum(out[1 : num_steps + 1], sigma_clip_threshold(pixel))
    return out


def resolve(spec: str | Variance, c: Chain, stats: Mapping[str, np.ndarray] | None = None, *,
            decoder: str | None = None, clip_steps: int = 0, clip_pixel: float = 2.0,
            for_bound: bool = False) -> Resolved:
    """σ_t² of `spec` on chain `c`, as float32 [K] arrays (host float64 first), ready for the sampler or the bound.

    stats: {name: float64 [T] over the FULL chain} for the statistics the record needs (read at
    c.timesteps). decoder: a key of DECODERS (default: the record's own); a DDIM record's sampler
    ends on x̂_0 with no decoder variance, so it is applied to DDIM only for_bound.
    clip_steps, clip_pixel: Analytic-DPM's clipping of the last noisy steps (sampling only; 0 = off).
    """
    record = get(spec)
    check(record)
    if record.from_network:
        return Resolved(record, None, None, None)
    decoder = record.decoder if decoder is None else decoder
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    stats = {} if stats is None else stats
    missing = [s.name for s in record.needs if s.name not in stats]
    if missing:
        raise ValueError(f"variance {record.name!r} needs stats {missing} ({'; '.join(s.doc for s in record.needs)}), "
                         f"estimated over the full chain, shape [T]")
    own = {s.name: statistics.at_steps(s.name, stats[s.name], c.timesteps) for s in record.needs}
    sigma2 = np.asarray(record.variance(c, own), np.float64)
    if sigma2.shape != (c.num_steps,):
        raise ValueError(f"variance {record.name!r} returned shape {sigma2.shape}, expected [{c.num_steps}]")
    if record.ddim_eta is None or for_bound:  # DDIM's last sampling step is x̂_0 itself: no decoder variance
        sigma2 = DECODERS[decoder](sigma2, c)
    if clip_steps and not for_bound:
        sigma2 = clip_last_steps(sigma2, clip_steps, clip_pixel)
    positive_needed = record.ddim_eta is None or for_bound
    if not np.all(np.isfinite(sigma2) & (sigma2 >= 0.0)) or (positive_needed and np.any(sigma2 <= 0.0)):
        raise ValueError(f"variance {record.name!r} gave σ² outside (0, ∞) at steps "
                         f"{np.flatnonzero(~(sigma2 > 0))[:5].tolist()}")
    with np.errstate(divide="ignore"):  # DDIM η = 0: log 0 = −inf, never read
        log_sigma2 = np.log(sigma2)
    return Resolved(record, sigma2.astype(np.float32), log_sigma2.astype(np.float32), decoder)


def batch_log_variance(network: NetworkFn | None, log_variance: Array | None, schedule: Schedule,
                       var_output: Array | None, t: Array, shape: tuple[int, ...]) -> Array:
    """log σ_t² for a batch [B, 1, ..., 1] (or like var_output): the resolved [K] array read at t, or the
    network's variance channels through the record's `network` function."""
    if network is not None:
        return network(schedule, var_output, t)
    return extract(log_variance, t, shape)
