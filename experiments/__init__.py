"""Experiments: one ml_collections config per experiment (configs/) and experiment drivers (sigma_ablation/)."""
