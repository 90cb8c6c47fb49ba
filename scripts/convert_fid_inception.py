"""Converts pytorch-fid's FID Inception weights (.pth) to the .npz that ddpm_jax loads.

  1. Download (once, by hand; nothing in ddpm_jax downloads at run time):
     https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  2. python scripts/convert_fid_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.npz
     (needs torch, only for this step)
  3. export DDPM_JAX_FID_WEIGHTS=$PWD/fid_inception.npz
     (or pass the path to ddpm_jax.evaluation.inception.load_inception_variables)

The .npz holds one array per state_dict key, names and PyTorch layouts unchanged,
without the "num_batches_tracked" counters (see ddpm_jax/evaluation/inception.py).
The file's SHA-256 must start with 6726825d, the hash in its name (as torch.hub
checks), so that FIDs are computed with the published weights.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddpm_jax.evaluation.inception import state_dict_to_variables  # noqa: E402

EXPECTED_SHA256_PREFIX = "6726825d"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(pth_path, npz_path, check_hash=True):
    """Reads the .pth state_dict with torch and writes it as a float32 .npz."""
    if check_hash:
        digest = sha256_of(pth_path)
        if not digest.startswith(EXPECTED_SHA256_PREFIX):
            raise ValueError(f"{pth_path} has SHA-256 {digest}, not 6726825d...: it is not "
                             "pt_inception-2015-12-05-6726825d.pth (use --skip-hash-check to force).")
    import torch  # Only this conversion needs torch.

    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
    arrays = {key: value.numpy().astype(np.float32) for key, value in state_dict.items()
              if not key.endswith("num_batches_tracked")}
    state_dict_to_variables(arrays)  # Raises on missing, extra or misshapen entries.
    np.savez(npz_path, **arrays)
    return len(arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pth", help="pt_inception-2015-12-05-6726825d.pth from pytorch-fid's release")
    parser.add_argument("npz", help="output .npz path")
    parser.add_argument("--skip-hash-check", action="store_true",
                        help="convert even if the SHA-256 does not start with 6726825d")
    args = parser.parse_args()
    count = convert(args.pth, args.npz, check_hash=not args.skip_hash_check)
    print(f"wrote {count} arrays to {args.npz}; set DDPM_JAX_FID_WEIGHTS={os.path.abspath(args.npz)}")


if __name__ == "__main__":
    main()
