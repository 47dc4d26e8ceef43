"""Kubernetes helpers: the Kubeflow Trainer TrainJob launcher for multi-node pretraining (trainjob.py)."""
