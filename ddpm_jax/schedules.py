"""The variance schedule β_1..β_T and every quantity derived from it.

Everything is computed once, in float64 NumPy on the host, next to the formula
it comes from, and stored as float32 in an immutable pytree (`Schedule`) that
device code gathers from by the zero-based step index t (t = 0 is the paper's
t = 1). Notation: Ho et al. (2020) with α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s.
The seed note writes the same quantities squared-free: its α_t² is our α_t,
its β_t² our β_t, its ᾱ_t² our ᾱ_t (see docs/derivation.md).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# When ᾱ_T = 0 (zero terminal SNR), 1/√ᾱ_T and 1/√α_T are infinite; like
# diffusers we replace the zero by a tiny value so ε→x₀ stays finite in float32.
# The floor is put on α_T (ᾱ_T := 2⁻²⁴ ᾱ_{T−1}), not on ᾱ_T itself: a fixed ᾱ
# floor exceeds ᾱ_{T−1} for common chains (linear T = 1000 rescaled has
# ᾱ_{T−1} ≈ 4e-9), which would give α_T > 1 and break α = 1 − β, ᾱ = ∏α.
ZERO_SNR_ALPHA = 2.0**-24


@flax.struct.dataclass
class Schedule:
    """All arrays have shape [K] (K = T for the full chain, fewer when respaced).

    `timesteps[i]` is the step of the original T-step chain that step i stands
    for; the model is always conditioned on it, so a network trained on T
    steps can run on a respaced sub-chain.
    """

    betas: jax.Array  # β_t
    alphas: jax.Array  # α_t = 1 − β_t
    alphas_cumprod: jax.Array  # ᾱ_t
    alphas_cumprod_prev: jax.Array  # ᾱ_{t−1}, with ᾱ_0 = 1
    sqrt_alphas_cumprod: jax.Array  # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: jax.Array  # √(1 − ᾱ_t)
    log_one_minus_alphas_cumprod: jax.Array  # log(1 − ᾱ_t)
    sqrt_recip_alphas_cumprod: jax.Array  # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: jax.Array  # √(1/ᾱ_t − 1)
    log_betas: jax.Array  # log β_t (fixed-large log-variance)
    posterior_variance: jax.Array  # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), eq. 7
    posterior_log_variance_clipped: jax.Array  # log β̃_t with β̃_1 := β̃_2
    posterior_mean_coef1: jax.Array  # √ᾱ_{t−1} β_t / (1 − ᾱ_t), multiplies x₀
    posterior_mean_coef2: jax.Array  # √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), multiplies x_t
    timesteps: jax.Array  # int32 index into the original chain
    # ᾱ_t in float64 as its raw bits (uint32 [K, 2]): the device holds float32 only, and host code
    # (variances.chain) recovers the exact float64 ᾱ from these to compute σ_t² in float64.
    alphas_cumprod_f64_bits: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


# --------------------------------------------------------------------------
# β schedules, float64. Each returns np.ndarray [T].


def linear_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """Ho et al. 2020, §4: β linear from 1e-4 to 0.02 at T = 1000.

    For other T the end points scale by 1000/T (Nichol & Dhariwal 2021), so the
    chain keeps the same total noise; pass beta_start/beta_end to override.
    """
    scale = 1000.0 / num_timesteps
    start = 1e-4 * scale if beta_start is None else beta_start
    _check_beta_range("beta_start", start)
    end = 0.02 * scale if beta_end is None else beta_end
    if beta_end is None and end >= 1.0:
        raise ValueError(
            f"num_timesteps must be > 20 for the default linear schedule (β_end = 0.02·1000/T must stay "
            f"below 1), got {num_timesteps}; pass beta_end explicitly"
        )
    _check_beta_range("beta_end", end)
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), β clipped at max_beta."""
    if not (_is_real(s) and 0.0 <= s < math.inf):
        raise ValueError(f"s must be a finite number >= 0, got {s!r}")
    _check_beta_range("max_beta", max_beta)
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return np.clip(betas, 0.0, max_beta)


def quadratic_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s code ('quad'): √β linear from √beta_start to √beta_end."""
    _check_beta_range("beta_start", beta_start)
    _check_beta_range("beta_end", beta_end)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β = beta_start + (beta_end − beta_start)·sigmoid(u), u linear in [−6, 6] (GeoDiff, Xu et al. 2022)."""
    _check_beta_range("beta_start", beta_start)
    _check_beta_range("beta_end", beta_end)
    u = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-u))


def custom_betas(num_timesteps: int, betas: Sequence[float]) -> np.ndarray:
    """A user-given β array of length T."""
    try:
        betas = np.asarray(betas, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a sequence of {num_timesteps} numbers, got {betas!r}") from None
    if betas.shape != (num_timesteps,):
        raise ValueError(f"betas must have shape ({num_timesteps},) = (num_timesteps,), got {betas.shape}")
    return betas


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "quadratic": quadratic_betas,
    "sigmoid": sigmoid_betas,
    "custom": custom_betas,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift and scale √ᾱ so √ᾱ_T = 0 while √ᾱ_1 is kept."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    return 1.0 - alphas


# --------------------------------------------------------------------------
# Derived quantities and the public constructor.


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_beta_range(name: str, value: float) -> None:
    if not (_is_real(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def validate_betas(betas: np.ndarray, *, allow_terminal_one: bool = False) -> None:
    """β must be finite and in (0, 1); β_T = 1 is allowed only for a zero-terminal-SNR chain."""
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    inside = np.isfinite(betas) & (betas > 0.0) & (betas < 1.0)
    if allow_terminal_one:
        inside[-1] = betas[-1] == 1.0
    if not np.all(inside):
        raise ValueError(f"betas must lie in the open interval (0, 1); got values such as {betas[~inside][:3].tolist()}")


def floor_terminal(alphas_cumprod: np.ndarray) -> np.ndarray:
    """A float64 copy of ᾱ with a zero ᾱ_T (zero terminal SNR) replaced by ZERO_SNR_ALPHA · ᾱ_{T−1}."""
    ac = np.array(alphas_cumprod, dtype=np.float64)
    if ac[-1] == 0.0:
        ac[-1] = ZERO_SNR_ALPHA * (ac[-2] if len(ac) > 1 else 1.0)
    return ac


def schedule_from_alphas_cumprod(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> Schedule:
    """Builds every derived array from ᾱ_t (float64) for the chain that visits `timesteps`.

    β_t = 1 − ᾱ_t/ᾱ_{t−1}: this is how a respaced sub-chain gets its own β's.
    """
    ac = floor_terminal(alphas_cumprod)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    alphas = ac / ac_prev
    betas = 1.0 - alphas
    # Non-finite values are refused right below, so no RuntimeWarning is needed first.
    with np.errstate(divide="ignore", invalid="ignore"):
        one_minus_ac = 1.0 - ac
        posterior_variance = betas * (1.0 - ac_prev) / one_minus_ac
        # β̃_1 = 0: the log is clipped to β̃_2 (improved-diffusion), which only the
        # fixed-small decoder at t = 1 ever reads. A 1-step chain keeps log β_1.
        clipped = posterior_variance[1] if len(posterior_variance) > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.concatenate([[clipped], posterior_variance[1:]]))
        fields = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_ac),
            log_one_minus_alphas_cumprod=np.log(one_minus_ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            log_betas=np.log(betas),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=np.sqrt(ac_prev) * betas / one_minus_ac,
            posterior_mean_coef2=np.sqrt(alphas) * (1.0 - ac_prev) / one_minus_ac,
        )
    bad = sorted(k for k, v in fields.items() if not np.all(np.isfinite(v)))
    if bad:  # e.g. β ≈ 1e-20, below float64 resolution next to 1: 1 − ᾱ_1 = 0
        raise ValueError(f"betas give non-finite {bad}: each β must be resolvable next to 1 in float64 (β > ~1e-15)")
    # device_put of a float32 NumPy array: a jnp.asarray cast would compile a conversion per length.
    arrays = {k: jax.device_put(np.asarray(v, dtype=np.float32)) for k, v in fields.items()}
    bits = np.ascontiguousarray(ac, dtype=np.float64).view(np.uint32).reshape(len(ac), 2)
    return Schedule(**arrays, timesteps=jax.device_put(np.asarray(timesteps, dtype=np.int32)),
                    alphas_cumprod_f64_bits=jax.device_put(bits))


def alphas_cumprod_f64(schedule: Schedule) -> np.ndarray:
    """ᾱ_t of the chain exactly as it was computed in float64 on the host, [K]."""
    return np.ascontiguousarray(np.asarray(schedule.alphas_cumprod_f64_bits, np.uint32)).view(np.float64).reshape(-1)


def schedule_from_betas(betas: np.ndarray, *, zero_terminal_snr: bool = False) -> Schedule:
    """The schedule for a float64 β array; ᾱ_t = ∏_{s≤t}(1 − β_s) (Ho et al. eq. 4)."""
    betas = np.asarray(betas, dtype=np.float64)
    validate_betas(betas)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
        validate_betas(betas, allow_terminal_one=True)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if np.any(alphas_cumprod[:-1] <= 0.0):
        raise ValueError("betas drive ᾱ_t = ∏(1 − β_s) to 0 before the last step (float64 underflow); use fewer or smaller betas")
    return schedule_from_alphas_cumprod(alphas_cumprod, np.arange(len(betas)))


def get_schedule(name: str, num_timesteps: int, *, zero_terminal_snr: bool = False, **kwargs) -> Schedule:
    """The named β schedule of length T, with all derived arrays (float32).

    name: one of SCHEDULES ('linear', 'cosine', 'quadratic', 'sigmoid', 'custom');
    kwargs go to the schedule's function (e.g. beta_start, s, betas).
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"schedule name must be one of {sorted(SCHEDULES)}, got {name!r}")
    _check_int("num_timesteps", num_timesteps, 1, MAX_TIMESTEPS)
    if zero_terminal_snr and num_timesteps < 2:
        raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
    try:
        betas = SCHEDULES[name](int(num_timesteps), **kwargs)
    except TypeError as err:  # an unknown keyword for this schedule
        raise ValueError(f"invalid arguments for schedule {name!r}: {err}") from None
    return schedule_from_betas(betas, zero_terminal_snr=zero_terminal_snr)


# --------------------------------------------------------------------------
# Respacing (Nichol & Dhariwal 2021, §4; Song et al. 2021, DDIM §4.2).

SPACINGS = ("even", "quad", "uniform")
MAX_TIMESTEPS = 1_000_000  # far beyond any published chain; bounds host memory before anything is built


def space_timesteps(num_timesteps: int, num_steps: int, kind: str = "even") -> np.ndarray:
    """K increasing zero-based steps of a T-step chain, always including t = 0 (the paper's t = 1).

    'even': round(linspace(0, T−1, K)), which also keeps the last step T−1.
    'quad': DDIM's quadratic spacing, ⌊linspace(0, √(0.8T), K)²⌋, made strictly increasing.
    'uniform': DDIM's code's "uniform" skip, range(0, T, ⌊T/K⌋) (Song et al. 2021, released code;
      also Analytic-DPM's 'linear_ddim'): it does not keep T−1 (at T = 1000, K = 10 its last step is
      900). When K does not divide T that range has more than K steps; we keep its first K.
    """
    if not isinstance(kind, str) or kind not in SPACINGS:
        raise ValueError(f"spacing kind must be one of {SPACINGS}, got {kind!r}")
    _check_int("num_timesteps", num_timesteps, 1, MAX_TIMESTEPS)
    _check_int("num_steps", num_steps, 1, num_timesteps)
    if kind == "even":
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    elif kind == "uniform":
        steps = np.arange(0, num_timesteps, num_timesteps // num_steps, dtype=np.int64)[:num_steps]
    else:
        # Truncated like DDIM's code (int(s) for s in linspace(0, √(0.8T), K)²).
        steps = np.floor(np.linspace(0.0, math.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
        steps = np.minimum(steps, num_timesteps - 1)  # round(0.8·T) = T when T = 2
        steps = _make_strictly_increasing(steps, num_timesteps)
    return steps


def kept_steps(num_timesteps: int, num_steps: int | None = None, spacing: str = "even",
               steps: Sequence[int] | None = None) -> np.ndarray:
    """The one sub-chain rule: the increasing steps a K-step chain keeps (all T when K is None or T).

    `steps` given explicitly wins (num_steps must then be None); otherwise space_timesteps(T, K, spacing).
    """
    if steps is not None:
        if num_steps is not None:
            raise ValueError("give num_steps or steps, not both")
        return validate_steps(steps, num_timesteps)
    if num_steps is None or num_steps == num_timesteps:
        return np.arange(num_timesteps)
    return space_timesteps(num_timesteps, num_steps, spacing)


def sub_chain(schedule: Schedule, kept: np.ndarray) -> Schedule:
    """The chain the sampler and the bound run for `kept`: `schedule` itself when every step is kept (its exact
    float64 ᾱ), else `respace(schedule, kept)`."""
    return schedule if len(kept) == schedule.num_timesteps else respace(schedule, kept)


def _make_strictly_increasing(steps: np.ndarray, num_timesteps: int) -> np.ndarray:
    # Quadratic spacing rounds several early steps onto the same integer.
    out = steps.copy()
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    if out[-1] >= num_timesteps:
        raise ValueError(f"'quad' spacing cannot place {len(steps)} distinct steps in {num_timesteps}")
    return out


def validate_steps(steps: Sequence[int], num_timesteps: int) -> np.ndarray:
    try:
        as_array = np.asarray(steps)
    except (TypeError, ValueError):
        as_array = np.asarray([None])
    if as_array.dtype.kind not in "iu":  # floats are refused, not truncated
        raise ValueError(f"steps must be a list of integer step indices, got {steps!r}")
    steps = as_array.astype(np.int64)
    if steps.ndim != 1 or len(steps) < 1:
        raise ValueError(f"steps must be a non-empty 1-D list of step indices, got shape {steps.shape}")
    if steps[0] < 0 or steps[-1] >= num_timesteps or np.any(np.diff(steps) <= 0):
        raise ValueError(f"steps must be strictly increasing integers in [0, {num_timesteps - 1}], got {steps.tolist()}")
    return steps


def respace(schedule: Schedule, steps: Sequence[int]) -> Schedule:
    """The K-step sub-chain visiting `steps` (indices into `schedule`).

    Its β's are recomputed from ᾱ at the kept steps, β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}}
    (Nichol & Dhariwal 2021, §4), so q(x_{s_i}|x_0) is unchanged.
    """
    steps = validate_steps(steps, schedule.num_timesteps)
    return schedule_from_alphas_cumprod(respaced_alphas_cumprod(schedule, steps), np.asarray(schedule.timesteps)[steps])


def respaced_alphas_cumprod(schedule: Schedule, steps: np.ndarray) -> np.ndarray:
    """ᾱ at `steps` in float64, as `respace` computes it (host only: the schedule must be concrete).

    ᾱ = ∏α in float64 from the parent's per-step float32 values, taking α = 1 − β
    where β < ½ (exact for small β) and the stored α where β ≥ ½: 1 − β loses a
    small α in float32 (β = 1 − 2.4e-9 rounds to 1), the stored α keeps it.
    """
    betas = np.asarray(schedule.betas, dtype=np.float64)
    alphas_cumprod = np.cumprod(np.where(betas < 0.5, 1.0 - betas, np.asarray(schedule.alphas, dtype=np.float64)))
    return alphas_cumprod[steps]
