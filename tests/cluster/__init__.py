"""Cluster jobs: Slurm, Ray Jobs and Kubernetes backends against real schedulers."""
