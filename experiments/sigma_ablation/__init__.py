"""The σ_t ablation: every reverse-variance choice × sampling steps K × seed, for one trained model.

  python -m experiments.sigma_ablation --config=experiments/configs/ablation_quickstart.py --workdir=RUN_DIR

settings.py  the config's σ choices (records of ddpm_jax.variances) and its checks
runner.py    what a cell computes: statistics and pair costs (cached), samples, the bound (split over processes)
cells.py     the cells: plan, skip the finished, run, commit each atomically, rebuild the records
store.py     atomic files, the run identity check, the statistics cache
hosts.py     the split of rows over processes and the gather
report.py    aggregation over seeds, CSV, the markdown table, plots
__main__.py  the command: load the model, run, write the report
"""
