"""The σ_t ablation: every reverse-variance choice × sampling steps K × seed, for one trained model.

  python -m experiments.sigma_ablation --config=experiments/configs/ablation_quickstart.py --workdir=RUN_DIR

settings.py  the config's σ choices (records of ddpm_jax.variances) and its checks
runner.py    one record per (σ choice, K, seed): the bound, sample quality, sampling time
report.py    aggregation over seeds, CSV, the markdown table, plots
__main__.py  the command: load the model, run, write the report
"""
