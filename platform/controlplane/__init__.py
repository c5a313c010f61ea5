"""Atelier control plane: tenants, keys, datasets, jobs, models, billing (Django + DRF)."""
