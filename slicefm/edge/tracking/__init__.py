"""MLflow: runs, the model registry, pulls, preflight checks and the end-of-run summary."""
