"""The ablation's report: aggregation over seeds, CSV, the markdown table, plots, grids.

`aggregate` turns per-seed records into rows with mean and std over seeds; `write_csv` and
`markdown_table` report them; `write_report` writes every file of the output directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform

import jax
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from ddpm_jax.utils import images  # noqa: E402

ID_FIELDS = ("setting", "eta", "spacing", "K")
METRICS = ("nll_bpd", "fdd", "fid", "kid", "digits_is", "inception_is", "sample_time_s")
LABELS = {"nll_bpd": "NLL bound (bits/dim)", "fdd": "FDD", "fid": "FID", "kid": "KID",
          "digits_is": "digits IS", "inception_is": "IS", "sample_time_s": "sampling time (s)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1) over seeds; std is NaN for one seed."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def aggregate(records: list[dict], reference: str | None = None) -> list[dict]:
    """One row per (setting, eta, spacing, K), in first-seen order: <metric>_mean/_std over seeds for each
    metric present, and the paired differences to `reference` (see `paired_columns`)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[f] for f in ID_FIELDS), []).append(record)
    rows = []
    for ids, group in groups.items():
        row = dict(zip(ID_FIELDS, ids), num_seeds=len(group), num_samples=group[0].get("num_samples", 0),
                   compile_time_s=group[0].get("compile_time_s", math.nan))
        for metric in METRICS:
            if metric in group[0]:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        if "nll_stderr" in group[0]:
            row["nll_stderr_mean"] = float(np.mean([r["nll_stderr"] for r in group]))
            row["nll_examples"] = group[0]["nll_examples"]
        if reference is not None:
            row.update(paired_columns(group, groups, reference))
        if "steps" in group[0]:
            row["steps"] = group[0]["steps"]
        row["note"] = group[0]["note"]
        rows.append(row)
    return rows


QUALITY_METRICS = ("fdd", "fid", "kid", "digits_is", "inception_is")


def _critical(dof: int) -> float:
    """The two-sided 95 % critical value: Student's t with `dof` degrees of freedom (normal for dof = inf)."""
    return float(stats.norm.ppf(0.975) if math.isinf(dof) else stats.t.ppf(0.975, dof))


def paired_columns(group: list[dict], groups: dict[tuple, list[dict]], reference: str) -> dict:
    """Differences to the reference setting at the same (spacing, K), paired as the runs are.

    nll_diff: the mean over seeds of each seed's per-image paired difference (same images and x_t
    draws); its s.e. pools the seeds' s.e. (√Σse²/n). <metric>_diff for sample quality: the mean of
    the seed-paired differences (same x_T and noise), s.e. = std/√n over seeds (t with n − 1 dof).
    <x>_diff_significant: |mean| > the 95 % critical value × s.e.
    """
    first = group[0]
    ref_group = groups.get((reference, None, first["spacing"], first["K"]))
    if first["setting"] == reference or not ref_group:
        return {}
    ref_by_seed = {r["seed"]: r for r in ref_group}
    out = {}
    with_diff = [r for r in group if "nll_diff" in r]
    if with_diff:
        mean = float(np.mean([r["nll_diff"] for r in with_diff]))
        se = float(math.sqrt(sum(r["nll_diff_se"] ** 2 for r in with_diff)) / len(with_diff))
        out.update(nll_diff_mean=mean, nll_diff_se=se, nll_diff_significant=abs(mean) > _critical(math.inf) * se)
    for metric in QUALITY_METRICS:
        diffs = [r[metric] - ref_by_seed[r["seed"]][metric] for r in group
                 if metric in r and r["seed"] in ref_by_seed and metric in ref_by_seed[r["seed"]]]
        if len(diffs) >= 2:
            mean, std = _mean_std(diffs)
            se = std / math.sqrt(len(diffs))
            out.update({f"{metric}_diff_mean": mean, f"{metric}_diff_se": se,
                        f"{metric}_diff_significant": abs(mean) > _critical(len(diffs) - 1) * se})
    return out


INT_FIELDS = ("K", "seed", "num_samples", "nll_examples")
TEXT_FIELDS = ("setting", "spacing", "decoder", "note")


def read_records(path: str) -> list[dict]:
    """The records `write_csv` wrote (per_seed.csv), numbers parsed back and empty cells left out."""
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            record = {}
            for key, cell in row.items():
                if key in TEXT_FIELDS:
                    record[key] = cell
                elif key == "eta":
                    record[key] = float(cell) if cell else None
                elif cell != "":
                    record[key] = int(cell) if key in INT_FIELDS else float(cell)
            records.append(record)
    return records


def _columns(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return [c for c in columns if c != "note"] + ["note"]


def write_csv(rows: list[dict], path: str) -> None:
    """rows (aggregate or raw records) as CSV; a missing or NaN value is an empty cell."""
    columns = _columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None or (isinstance(row.get(c), float) and math.isnan(row[c]))
                             else row[c] for c in columns})


def _cell(row: dict, metric: str) -> str:
    """'mean ± std', both to the decimal of the std's second significant digit (at most 4 decimals)."""
    mean = row.get(f"{metric}_mean")
    if mean is None or math.isnan(mean):
        return "—"
    std = row[f"{metric}_std"]
    if math.isnan(std):
        return f"{mean:.4g}"
    decimals = 4 if std <= 0.0 else min(4, max(0, 1 - math.floor(math.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _diff_cell(row: dict, metric: str) -> str:
    """'+mean ± s.e.' of a paired difference, with † when it is not significant at 95 %."""
    mean = row.get(f"{metric}_diff_mean")
    if mean is None or math.isnan(mean):
        return "—"
    se = row[f"{metric}_diff_se"]
    decimals = 4 if not se > 0.0 else min(4, max(0, 1 - math.floor(math.log10(se))))
    return f"{mean:+.{decimals}f} ± {se:.{decimals}f}" + ("" if row[f"{metric}_diff_significant"] else " †")


def markdown_table(rows: list[dict], reference: str | None = None) -> str:
    """A markdown table (mean ± std over seeds), the paired differences to `reference` when present, and the notes
    of settings that have one as footnotes."""
    metrics_present = [m for m in METRICS if any(f"{m}_mean" in r for r in rows)]
    spacings = list(dict.fromkeys(r["spacing"] for r in rows))
    header = ["σ choice"] + (["spacing"] if len(spacings) > 1 else []) + ["K"] + [LABELS[m] for m in metrics_present]
    with_se = "nll_bpd" in metrics_present
    if with_se:  # the Monte Carlo error of one seed's bound, over test images and noise draws
        header.insert(header.index("K") + 2, "s.e. of one bound")
    diffs = [m for m in ("nll", *QUALITY_METRICS) if any(f"{m}_diff_mean" in r for r in rows)][:2]
    header += [f"Δ {'bound' if m == 'nll' else LABELS[m]} vs {reference}" for m in diffs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, str] = {}
    for row in rows:
        name = row["setting"]
        if row["note"]:
            notes.setdefault(name, row["note"])
            name += f" [{list(notes).index(name) + 1}]"
        cells = [_cell(row, m) for m in metrics_present]
        if with_se:
            se = row.get("nll_stderr_mean", math.nan)
            cells.insert(1, "—" if math.isnan(se) else f"{se:.2g}")
        cells += [_diff_cell(row, m) for m in diffs]
        ids = [name] + ([row["spacing"]] if len(spacings) > 1 else []) + [str(row["K"])]
        lines.append("| " + " | ".join(ids + cells) + " |")
    lines.append("")
    if diffs:
        lines.append(f"Δ: paired difference to {reference} at the same spacing and K (bound: per image, same x_t "
                     "draws, s.e. pooled over seeds; sample quality: per seed, same x_T and noise, s.e. over seeds). "
                     "† not significant at 95 %.  ")
    lines += [f"[{i + 1}] {name}: {note}  " for i, (name, note) in enumerate(notes.items())]
    return "\n".join(lines) + "\n"


DECODER_TEXT = {
    "full_chain": "σ_1² = β̃_2 of the full chain for every σ choice, as Analytic-DPM's code",
    "sub_chain": "σ_1² = β̃ of the sub-chain's second step, as improved-diffusion's respaced chains",
    "floor_sub_chain": "σ_1² = max(own σ_1², the sub-chain's β̃_2): this codebase's analytic σ before 2026-12",
    "own": "each σ record's own default: fixed σ 'sub_chain', analytic 'full_chain'",
}


def plot_vs_k(rows: list[dict], metrics: list[str], path: str, *, log_y: bool = False) -> None:
    """One panel per metric: mean vs K with std error bars, one line per σ choice (and spacing), log x axis."""
    settings = list(dict.fromkeys((r["setting"], r["spacing"]) for r in rows))
    several = len({spacing for _, spacing in settings}) > 1
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting, spacing in settings:
            sel = [r for r in rows if (r["setting"], r["spacing"]) == (setting, spacing)
                   and math.isfinite(r.get(f"{metric}_mean", math.nan))]
            if not sel:
                continue
            std = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in sel]
            ax.errorbar([r["K"] for r in sel], [r[f"{metric}_mean"] for r in sel], yerr=std, marker="o",
                        capsize=3, label=f"{setting} ({spacing})" if several else setting,
                        linestyle=":" if spacing == "optimal" else "--" if setting.startswith("ddim") else "-")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("K (sampling steps)")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def processor() -> str:
    """The processor's model name as the system reports it (/proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    device = jax.devices()[0]
    return {"platform": platform.platform(), "processor": processor(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "device": device.device_kind,
            "num_devices": jax.device_count()}


def portable_path(path: str) -> str:
    """A path to write into results: relative to the working directory when inside it, else its last component
    (results files never name a directory of one machine)."""
    relative = os.path.relpath(os.path.abspath(path))
    return relative if not relative.startswith("..") else os.path.basename(os.path.normpath(path))


def grid_name(setting: str, spacing: str | None, k) -> str:
    """grids/<setting>_K<K>.png (even spacing), <setting>_<spacing>_K<K>.png, or data_<split>.png."""
    if setting == "data":
        return f"data_{k}.png"
    return f"{setting}_K{k}.png" if spacing == "even" else f"{setting}_{spacing}_K{k}.png"


def write_report(out_dir: str, records: list[dict], grids: dict, info: dict,
                 reference: np.ndarray | None) -> list[dict]:
    reference_choice = info["config"].get("reference") or None
    rows = aggregate(records, reference_choice)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    write_csv(records, os.path.join(out_dir, "per_seed.csv"))
    quality = [m for m in ("fdd", "fid", "kid") if any(f"{m}_mean" in r for r in rows)]
    if any("nll_bpd_mean" in r for r in rows):
        plot_vs_k(rows, ["nll_bpd"], os.path.join(out_dir, "nll_vs_k.png"), log_y=True)
    if quality:
        plot_vs_k(rows, quality, os.path.join(out_dir, "quality_vs_k.png"))
    if grids:
        os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
        grids = {**grids, ("data", None, info["quality_reference"]): reference[: len(next(iter(grids.values())))]}
    for (setting, spacing, k), samples in grids.items():
        if samples.ndim == 4:  # image data; 2-D toy points have no grid
            images.save_grid(os.path.join(out_dir, "grids", grid_name(setting, spacing, k)), samples,
                             scale=max(1, 64 // samples.shape[1]))
    conventions = info["config"]["conventions"]
    header = (f"# σ_t ablation\n\n{info['dataset']}, checkpoint step {info['checkpoint_step']} of "
              f"`{info['workdir']}` ({info['num_params']:,} parameters, T = {info['num_timesteps']}, "
              f"trained with variance={info['trained_variance']}); seeds {info['seeds']}, "
              f"{info['num_samples'] or 'no'} samples per setting and seed, bound on {info['nll_examples']} "
              f"{info['nll_split']} images. Mean ± std over seeds; sampling time excludes compilation. "
              f"{info['date']}, {info['machine']['device']} ({info['machine']['cpu_count']} CPUs), "
              f"total wall time {info['wall_time_s'] / 60:.1f} min, code {info['git_commit']}.\n\n"
              f"Conventions: spacings {list(info['config']['spacings'])}; decoder-step variance "
              f"'{conventions['decoder']}' ({DECODER_TEXT.get(conventions['decoder'], '')}); σ clipped on the last "
              f"{conventions['sigma_clip_steps']} noisy sampling steps at {conventions['sigma_clip_pixel']} "
              f"8-bit levels (0: none); x̂_0 clipped when sampling: {info['config']['sample']['clip_x0']}, "
              f"in the bound: {info['config']['nll']['clip_x0']}; the decoder's normal CDF: "
              f"'{conventions.get('cdf', 'exact')}'.\n\n")
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(header + markdown_table(rows, reference_choice))
    with open(os.path.join(out_dir, "run_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
    return rows


# --------------------------------------------------------------------------
# Comparing a run's table with a reference (the quickstart's self-check).

# Every number of the table but the timings, which depend on the machine.
COMPARED = ("nll_bpd_mean", "nll_bpd_std", "nll_stderr_mean", "nll_diff_mean", "fdd_mean", "fdd_std", "kid_mean",
            "kid_std", "digits_is_mean", "digits_is_std", "fid_mean", "inception_is_mean")
ROW_ID = ("setting", "spacing", "K")


def _read_rows(path: str) -> dict[tuple, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return {tuple(row.get(k, "") for k in ROW_ID): row for row in csv.DictReader(f)}


def _scale(row: dict, column: str) -> float:
    """What a difference in `column` is relative to: the value itself, or for a spread X_std its mean X_mean.

    A spread over few seeds is ill-conditioned: over two seeds X_std = |x₁ − x₂|/√2, so a relative
    change δ in each x moves X_std by up to √2·δ·|X_mean|, which relative to X_std itself is
    √2·δ·|X_mean|/X_std (×63 for fixed_large's digits IS at K = 10: 5.16 ± 0.116). Measured
    against |X_mean| it is reproduced exactly when the values it is the spread of are.
    """
    value = abs(float(row[column]))
    if column.endswith("_std") and row.get(column[:-4] + "_mean", "") != "":
        return max(value, abs(float(row[column[:-4] + "_mean"])))
    return value


def compare_tables(run_csv: str, reference_csv: str, rtol: float) -> tuple[bool, float, list[str]]:
    """(reproduced, largest relative difference, one line per difference) between two results.csv files.

    A difference is relative to the reference's value, or for a spread X_std to its X_mean (`_scale`).
    """
    run, reference = _read_rows(run_csv), _read_rows(reference_csv)
    problems = [f"row {key} is missing from the run" for key in reference if key not in run]
    problems += [f"row {key} is not in the reference" for key in run if key not in reference]
    largest = 0.0
    for key in reference.keys() & run.keys():
        for column in COMPARED:
            want, got = reference[key].get(column, ""), run[key].get(column, "")
            if want == got == "":
                continue
            if (want == "") != (got == ""):
                problems.append(f"{key} {column}: reference {want or 'empty'}, run {got or 'empty'}")
                continue
            scale = _scale(reference[key], column)
            want, got = float(want), float(got)
            relative = abs(got - want) / max(scale, 1e-12)
            largest = max(largest, relative)
            if not relative <= rtol or math.isnan(relative):
                problems.append(f"{key} {column}: reference {want:.6g}, run {got:.6g} (relative {relative:.2g})")
    return not problems, largest, sorted(problems)
