"""Cluster submission (Slurm through submitit)."""
