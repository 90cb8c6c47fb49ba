"""Evaluation: likelihood (nll.py) and sample quality.

  metrics.py     FID / IS / KID formulas on features, float64 NumPy + SciPy.
  inception.py   the FID Inception-v3 (pytorch-fid weights, loaded from a local .npz).
  classifier.py  the offline digits classifier: FDD, digits IS and KID (not FID).
"""
