"""Mutation testing by hand: plant one known bug at a time and check that the tests catch it.

Each mutant is (name, file, exact original snippet, mutated snippet, the tests to run). The
repository is copied to a temporary directory once (the live tree is never written); each
mutant is applied to the copy, the listed tests run with `pytest -x -q` under a timeout, and
the file is restored. Prints a table (mutant, module, caught by which test or survived) and
writes it to benchmarks/results/plant_bugs.md with the date and machine.

    python scripts/plant_bugs.py                 # every mutant (~15-25 min on 2 cores)
    python scripts/plant_bugs.py -k variances    # mutants whose name or file contains 'variances'
    python scripts/plant_bugs.py --list          # the mutants, without running anything

A mutation-testing tool (mutmut, cosmic-ray) generates hundreds of mutants per module and
needs the whole suite per mutant: far beyond CI's time on this code. These are the bugs a
user would hit, each with the fast tests that should catch it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "plant_bugs.md"
TIMEOUT_S = 420


class Mutant(NamedTuple):
    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]


PB = "tests/test_planted_bugs.py"
TRAIN_FAST = ("tests/test_train.py::test_training_draws_every_t_uniformly_including_zero",
              "tests/test_train.py::test_adam_step_size_follows_the_warm_up_schedule",
              "tests/test_train.py::test_a_nonfinite_gradient_with_a_finite_loss_skips_the_update")
BOUND = "tests/test_losses.py::test_bound_is_prior_plus_every_term_each_recomputed_in_float64"
CLIP = ("tests/test_diffusion.py::test_clipped_p_mean_variance_recomputes_eps_from_the_clipped_x0",
        "tests/test_diffusion.py::test_clipped_ddim_step_uses_the_eps_of_the_clipped_x0")
DECODERS = "tests/test_variances.py::test_every_decoder_convention_is_applied_to_a_probe_record"
VAR = (PB, "tests/test_variances.py")
PRE = (PB, "tests/test_pretrained.py::test_fixture_output_matches_diffusers",
       "tests/test_pretrained.py::test_fixture_config_is_a_valid_experiment_config")
TRAJ = (PB, "tests/test_trajectories.py")
DDIM = (PB, "tests/test_ddim_bound.py")

MUTANTS = [
    # ---- the six bugs of issue 17 (they passed the whole default suite before) --------------------
    Mutant("prior L_T dropped from the bound", "ddpm_jax/losses.py",
           "dict(total=jnp.sum(terms, axis=0) + prior,", "dict(total=jnp.sum(terms, axis=0),", (BOUND,)),
    Mutant("training never draws t = 0", "ddpm_jax/train.py",
           "jax.random.randint(t_key, (), 0, num_timesteps)", "jax.random.randint(t_key, (), 1, num_timesteps)",
           TRAIN_FAST),
    Mutant("warm-up schedule not handed to Adam", "ddpm_jax/train.py",
           "optax.adam(learning_rate_fn(lr, warmup_steps))", "optax.adam(lr)", TRAIN_FAST),
    Mutant("NaN guard ignores a non-finite gradient", "ddpm_jax/train.py",
           "finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)", "finite = jnp.isfinite(loss)", TRAIN_FAST),
    Mutant("clip_x0: eps not recomputed (p_mean_variance)", "ddpm_jax/diffusion.py",
           "        pred_eps = x0_to_eps(schedule, x_t, t, pred_x0)\n", "", CLIP),
    Mutant("clip_x0: eps not recomputed (ddim_step)", "ddpm_jax/sampling.py",
           "        pred_eps = diffusion.x0_to_eps(schedule, x_t, t, pred_x0)\n", "", CLIP),
    Mutant("decoder convention not applied", "ddpm_jax/variances.py",
           "        sigma2 = DECODERS[decoder](sigma2, c)\n", "        pass\n", (DECODERS,) + VAR),
    Mutant("decoder floor's max dropped", "ddpm_jax/variances.py",
           "[[max(sigma2[0], c.sub_beta_tilde_2)], sigma2[1:]]", "[[sigma2[0]], sigma2[1:]]", (DECODERS,) + VAR),
    Mutant("full_chain decoder uses the sub-chain's β̃_2", "ddpm_jax/variances.py",
           "return np.concatenate([[c.full_beta_tilde_2], sigma2[1:]])",
           "return np.concatenate([[c.sub_beta_tilde_2], sigma2[1:]])", (DECODERS,) + VAR),
    Mutant("sub_chain decoder keeps the record's own σ_1²", "ddpm_jax/variances.py",
           "return np.concatenate([[c.sub_beta_tilde_2], sigma2[1:]])\n\n\ndef _floor",
           "return np.concatenate([[sigma2[0]], sigma2[1:]])\n\n\ndef _floor", (DECODERS,) + VAR),
    # ---- variances.py ---------------------------------------------------------------------------------
    Mutant("Chain.betas from ᾱ instead of α", "ddpm_jax/variances.py",
           "return 1.0 - self.alphas\n", "return 1.0 - self.alphas_cumprod\n", VAR),
    Mutant("β̃ ratio inverted", "ddpm_jax/variances.py",
           "return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)",
           "return self.betas * (1.0 - self.alphas_cumprod) / (1.0 - self.alphas_cumprod_prev + 1e-3)", VAR),
    Mutant("sub_beta_tilde_2 reads β instead of β̃", "ddpm_jax/variances.py",
           "self.posterior_variance[1] if self.num_steps > 1", "self.betas[1] if self.num_steps > 1", VAR),
    Mutant("full chain β̃_2 without its β_2 factor", "ddpm_jax/variances.py",
           "return float((1.0 - ac2 / ac1) * (1.0 - ac1) / (1.0 - ac2))",
           "return float((1.0 - ac2) * (1.0 - ac1) / (1.0 - ac2))", VAR),
    Mutant("a respaced schedule alone claims the full β̃_2", "ddpm_jax/variances.py",
           "knows_first_two = timesteps[0] == 0 and len(timesteps) > 1 and timesteps[1] == 1",
           "knows_first_two = timesteps[0] == 0 and len(timesteps) > 1", VAR),
    Mutant("analytic σ² not clipped to Thm. 2", "ddpm_jax/variances.py",
           "return np.clip(sigma2, lam2, lam2 + c.posterior_mean_coef1**2)", "return np.maximum(sigma2, lam2)", VAR),
    Mutant("analytic decoder default sub_chain", "ddpm_jax/variances.py",
           'needs=(statistics.GAMMA,), decoder="full_chain"', 'needs=(statistics.GAMMA,), decoder="sub_chain"', VAR),
    Mutant("DDIM σ² = η β̃ (not η²)", "ddpm_jax/variances.py",
           "return eta**2 * c.posterior_variance", "return eta * c.posterior_variance", VAR),
    Mutant("DDIM bound without decoder variance", "ddpm_jax/variances.py",
           "if record.ddim_eta is None or for_bound:  # DDIM", "if record.ddim_eta is None:  # DDIM", VAR),
    Mutant("σ clip applied in the bound too", "ddpm_jax/variances.py",
           "if clip_steps and not for_bound:", "if clip_steps:", VAR),
    Mutant("σ clip threshold without √(π/2)", "ddpm_jax/variances.py",
           "math.sqrt(math.pi / 2.0)) ** 2", "1.0) ** 2", VAR),
    Mutant("σ clip on the wrong steps", "ddpm_jax/variances.py",
           "out[1 : num_steps + 1] = np.minimum(out[1 : num_steps + 1],",
           "out[0:num_steps] = np.minimum(out[0:num_steps],", VAR),
    Mutant("statistic read at 0..K-1, not the kept steps", "ddpm_jax/variances.py",
           "statistics.at_steps(s.name, stats[s.name], c.timesteps)",
           "np.asarray(stats[s.name], np.float64)[: c.num_steps]", VAR),
    Mutant("learned_range v not mapped to [0, 1]", "ddpm_jax/variances.py",
           "frac = (var_output + 1.0) / 2.0", "frac = var_output", VAR + ("tests/test_losses.py",)),
    Mutant("DDIM η > 1 accepted", "ddpm_jax/variances.py",
           "if not 0.0 <= eta <= 1.0:", "if not 0.0 <= eta:", VAR),
    # ---- statistics.py --------------------------------------------------------------------------------
    Mutant("padded rows counted in Γ", "ddpm_jax/statistics.py",
           "        yield batch, count", "        yield batch, batch_size", (PB,)),
    Mutant("Γ divided by the step count", "ddpm_jax/statistics.py",
           "result[name][steps] = total / data.shape[0]", "result[name][steps] = total / len(steps)", (PB,)),
    Mutant("Γ of |ε| instead of ε²", "ddpm_jax/statistics.py",
           "(mean_flat(eps**2), mean_flat((eps - noise) ** 2))", "(mean_flat(jnp.abs(eps)), mean_flat((eps - noise) ** 2))",
           (PB,)),
    Mutant("Γ reads the variance channels", "ddpm_jax/statistics.py",
           "return model_fn(x_t, t)[..., : x_t.shape[-1]]", "return model_fn(x_t, t)[..., -x_t.shape[-1]:]", (PB,)),
    Mutant("at_steps reads the first K entries", "ddpm_jax/statistics.py",
           "picked = values[timesteps]", "picked = values[: len(timesteps)]", (PB,)),
    Mutant("at_steps accepts NaN (unestimated) steps", "ddpm_jax/statistics.py",
           "if not np.all(np.isfinite(picked)):", "if False:", (PB,)),
    # ---- trajectories.py ------------------------------------------------------------------------------
    Mutant("DP takes argmax", "ddpm_jax/trajectories.py",
           "parents[k] = np.argmin(candidates, axis=0)", "parents[k] = np.argmax(np.where(np.isinf(candidates), "
           "-np.inf, candidates), axis=0)", TRAJ),
    Mutant("pair KL mean term without ½", "ddpm_jax/trajectories.py",
           "c2 * eps_mse / (2.0 * sigma2)", "c2 * eps_mse / sigma2", TRAJ),
    Mutant("pair KL log term sign", "ddpm_jax/trajectories.py",
           "0.5 * (ratio - 1.0 - np.log(ratio))", "0.5 * (ratio - 1.0 + np.log(ratio))", TRAJ),
    Mutant("pair chain (ᾱ_t, ᾱ_s) swapped", "ddpm_jax/trajectories.py",
           "np.stack([ac[s], ac[t]], axis=1).ravel()", "np.stack([ac[t], ac[s]], axis=1).ravel()", TRAJ),
    Mutant("pair c² ratio inverted", "ddpm_jax/trajectories.py",
           "(1.0 - pair.alphas_cumprod[1::2]) / pair.alphas_cumprod[1::2]",
           "pair.alphas_cumprod[1::2] / (1.0 - pair.alphas_cumprod[1::2])", TRAJ),
    Mutant("decoder not folded into the DP matrix", "ddpm_jax/trajectories.py",
           "        F[0] += self.decoder\n", "", TRAJ),
    Mutant("trajectory total without the prior", "ddpm_jax/trajectories.py",
           "return float(self.prior + trajectory_cost(self.matrix, steps))",
           "return float(trajectory_cost(self.matrix, steps))", TRAJ),
    Mutant("first-step σ² read at the chain's last step", "ddpm_jax/trajectories.py",
           "decoder=decoder, for_bound=True).log_variance[0]", "decoder=decoder, for_bound=True).log_variance[-1]", TRAJ),
    Mutant("ε MSE of ε + ε_θ", "ddpm_jax/statistics.py",
           "mean_flat((eps - noise) ** 2))", "mean_flat((eps + noise) ** 2))", TRAJ),
    # ---- ddim_bound.py --------------------------------------------------------------------------------
    Mutant("DDIM mean error without the ε term", "ddpm_jax/ddim_bound.py",
           "return x0_coef * (x0 - pred_x0) + eps_coef * (noise - pred_eps)", "return x0_coef * (x0 - pred_x0)", DDIM),
    Mutant("DDIM KL without ½", "ddpm_jax/ddim_bound.py",
           "mean_flat(0.5 * error**2 / sigma2)", "mean_flat(error**2 / sigma2)", DDIM),
    Mutant("DDIM ε coefficient ignores σ²", "ddpm_jax/ddim_bound.py",
           "diffusion.extract(one_minus_ac_prev, t, x0.shape) - sigma2, 0.0)",
           "diffusion.extract(one_minus_ac_prev, t, x0.shape), 0.0)", DDIM),
    Mutant("DDIM bound without the prior", "ddpm_jax/ddim_bound.py",
           "dict(total=jnp.sum(terms, axis=0) + prior,", "dict(total=jnp.sum(terms, axis=0),", DDIM),
    Mutant("DDIM bound: eps not recomputed after clipping", "ddpm_jax/ddim_bound.py",
           "            pred_eps = diffusion.x0_to_eps(schedule, x_t, t, pred_x0)\n", "", DDIM),
    Mutant("DDIM decoder and KL swapped at t = 0", "ddpm_jax/ddim_bound.py",
           "return jnp.where(t == 0, decoder_nll, kl)", "return jnp.where(t == 0, kl, decoder_nll)", DDIM),
    Mutant("DDIM bound accepts η = 0", "ddpm_jax/ddim_bound.py",
           "not 0.0 < eta <= 1.0:", "not 0.0 <= eta <= 1.0:", DDIM),
    # ---- resume.py ------------------------------------------------------------------------------------
    Mutant("workdir lock shared, not exclusive", "ddpm_jax/resume.py",
           "fcntl.LOCK_EX | fcntl.LOCK_NB", "fcntl.LOCK_SH | fcntl.LOCK_NB", (PB,)),
    Mutant("workdir lock never released", "ddpm_jax/resume.py",
           "            os.close(fd)  # releases the lock", "            pass", (PB,)),
    Mutant("lock holder not recorded", "ddpm_jax/resume.py",
           "    os.pwrite(fd, json.dumps(holder).encode(), 0)\n", "", (PB,)),
    Mutant("a group name no longer covers its fields", "ddpm_jax/resume.py",
           'return any(path == name or path.startswith(name + ".") for name in MAY_CHANGE_ON_RESUME)',
           "return any(path == name for name in MAY_CHANGE_ON_RESUME)", (PB,)),
    Mutant("lr may change on resume", "ddpm_jax/resume.py",
           '"training.num_train_steps", "training.log_every",',
           '"training.num_train_steps", "training.lr", "training.log_every",', (PB,)),
    Mutant("run fields count as experiment changes", "ddpm_jax/resume.py",
           "if not _may_change(path) and old.get(path, absent)", "if old.get(path, absent)", (PB,)),
    Mutant("a changed config resumes without allow", "ddpm_jax/resume.py",
           "if changes and not allow:", "if changes and allow is None:", (PB,)),
    # ---- pretrained.py --------------------------------------------------------------------------------
    Mutant("conv kernel kh/kw swapped", "ddpm_jax/pretrained.py",
           "return value.transpose(2, 3, 1, 0)", "return value.transpose(3, 2, 1, 0)", PRE),
    Mutant("dense kernel not transposed", "ddpm_jax/pretrained.py",
           "return value.reshape(value.shape[:2]).T", "return value.reshape(value.shape[:2])", PRE),
    Mutant("up-block levels not reversed", "ddpm_jax/pretrained.py",
           "level = int(level) if kind == \"down_blocks\" else num_levels - 1 - int(level)",
           "level = int(level)", PRE),
    Mutant("to_q/to_k swapped", "ddpm_jax/pretrained.py",
           '"to_q": "q", "query": "q", "to_k": "k",', '"to_q": "k", "query": "q", "to_k": "q",', PRE),
    Mutant("mid-block index off by one", "ddpm_jax/pretrained.py",
           'modules = [f"mid_{_BLOCKS[sub]}_{int(index) + 1}", *modules]',
           'modules = [f"mid_{_BLOCKS[sub]}_{2 - int(index)}", *modules]', PRE),
    Mutant("norm weight read as kernel", "ddpm_jax/pretrained.py",
           'leaf = "scale" if modules[-1].startswith("norm") else "kernel"', 'leaf = "kernel"', PRE),
    Mutant("fixed_large mapped to fixed_small", "ddpm_jax/pretrained.py",
           '"fixed_large": "fixed_large",', '"fixed_large": "fixed_small",', PRE),
    Mutant("sample prediction mapped to eps", "ddpm_jax/pretrained.py",
           '"sample": "x0"', '"sample": "eps"', PRE),
    Mutant("scaled_linear mapped to linear", "ddpm_jax/pretrained.py",
           '"scaled_linear": ("quadratic", ends)', '"scaled_linear": ("linear", ends)', PRE),
    Mutant("cosine cap 0.99", "ddpm_jax/pretrained.py",
           '{"s": 0.008, "max_beta": 0.999}', '{"s": 0.008, "max_beta": 0.99}', PRE),
    Mutant("clip_sample ignored", "ddpm_jax/pretrained.py",
           'clip_x0=bool(cfg["clip_sample"]))', "clip_x0=True)", PRE),
    Mutant("learned variance's 2C channels not required", "ddpm_jax/pretrained.py",
           "wanted = variances.model_channels(channels, variances.get(diff[\"variance\"]).from_network)",
           "wanted = unet[\"out_channels\"]",
           PRE),
    Mutant("attention resolution one level off", "ddpm_jax/pretrained.py",
           "attn_resolutions=tuple(size // 2 ** level for level in attn_levels)",
           "attn_resolutions=tuple(size // 2 ** (level + 1) for level in attn_levels)", PRE),
    Mutant("flip_sin_to_cos=True accepted", "ddpm_jax/pretrained.py",
           '"flip_sin_to_cos": ((False,),', '"flip_sin_to_cos": ((False, True),', PRE),
]


def module_of(mutant: Mutant) -> str:
    return pathlib.Path(mutant.file).stem


def copy_repository(destination: pathlib.Path) -> pathlib.Path:
    """The working tree (tracked and untracked files) without .git, virtualenvs, run outputs and caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                    "workdir*", "results", "*.egg-info")
    target = destination / "repo"
    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)
    return target


def run_tests(repo: pathlib.Path, tests: tuple[str, ...], timeout: int) -> tuple[str, str, float]:
    """(outcome 'passed' | 'failed' | 'timeout' | 'error', the first failing test, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - start
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if proc.returncode == 0:
        return "passed", "", seconds
    if proc.returncode == 1 and failed:
        reason = re.findall(r"^E\s+(.+)$", out, flags=re.M)
        print(f"    {failed[0]}: {reason[0][:160] if reason else ''}", flush=True)
        return "failed", failed[0], seconds
    return "error", (failed[0] if failed else out.strip().splitlines()[-1] if out.strip() else "?"), seconds


def check_imports_the_copy(repo: pathlib.Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo))
    where = subprocess.run([sys.executable, "-c", "import ddpm_jax; print(ddpm_jax.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(repo)):
        raise SystemExit(f"the copy's tests import ddpm_jax from {where}, not from {repo}: mutants would not apply")


def machine() -> str:
    cpu = "unknown processor"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), flags=re.M)
        if names:
            cpu = f"{names[0].strip()} ({len(names)} logical CPUs)"
    except OSError:
        pass
    return f"{platform.node()} | {platform.platform()} | {cpu} | Python {platform.python_version()}"


def write_table(rows: list[dict], path: pathlib.Path, seconds: float, selection: str) -> str:
    caught = sum(r["outcome"] == "failed" for r in rows)
    modules = sorted({r["module"] for r in rows})
    lines = [
        "# Planted bugs: which tests catch them",
        "",
        f"Produced by `scripts/plant_bugs.py{selection}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min.",
        "",
        f"Machine: {machine()}",
        "",
        f"**Caught {caught} of {len(rows)} planted bugs** "
        f"({100.0 * caught / max(len(rows), 1):.0f}%). Each mutant is applied alone to a copy of the tree; "
        "its listed tests run with `pytest -x -q`; caught = a test failed.",
        "",
        "| module | caught | planted |",
        "|---|---|---|",
    ]
    for module in modules:
        mine = [r for r in rows if r["module"] == module]
        lines.append(f"| {module} | {sum(r['outcome'] == 'failed' for r in mine)} | {len(mine)} |")
    lines += ["", "| # | mutant | module | result | caught by | s |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        result = {"failed": "caught", "passed": "**survived**", "timeout": "**timeout**",
                  "error": "**error**"}[r["outcome"]]
        lines.append(f"| {i} | {r['name']} | {r['module']} | {result} | `{r['by']}` | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name or file contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--baseline", action="store_true", help="first run every listed test on the unmutated copy")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per mutant")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.k in m.name or args.k in m.file]
    if args.list:
        for i, m in enumerate(mutants, 1):
            print(f"{i:3d}  {module_of(m):13s} {m.name}  ->  {', '.join(m.tests)}")
        return
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plant_bugs_") as tmp:
        repo = copy_repository(pathlib.Path(tmp))
        check_imports_the_copy(repo)
        for m in mutants:  # every snippet must be found exactly once before anything runs
            count = (repo / m.file).read_text(encoding="utf-8").count(m.original)
            if count != 1:
                raise SystemExit(f"mutant {m.name!r}: the original snippet occurs {count} times in {m.file}")
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            outcome, by, seconds = run_tests(repo, tests, 4 * args.timeout)
            print(f"baseline (no mutant): {outcome} {by} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                raise SystemExit("the unmutated copy fails its tests: fix that first")
        for i, m in enumerate(mutants, 1):
            path = repo / m.file
            original = path.read_text(encoding="utf-8")
            try:
                path.write_text(original.replace(m.original, m.mutated, 1), encoding="utf-8")
                outcome, by, seconds = run_tests(repo, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            rows.append(dict(name=m.name, module=module_of(m), outcome=outcome, by=by, seconds=seconds))
            print(f"[{i}/{len(mutants)}] {module_of(m):13s} {m.name:50s} "
                  f"{'caught' if outcome == 'failed' else outcome.upper():8s} {by} ({seconds:.0f} s)", flush=True)
    selection = f" -k {args.k}" if args.k else ""
    print(write_table(rows, pathlib.Path(args.out), time.perf_counter() - start, selection))


if __name__ == "__main__":
    main()
