"""Loop-side helpers: metric writers and image grids (no diffusion math here)."""
