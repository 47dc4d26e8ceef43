"""The edge: the only code that talks to the user (CLI), Kubeflow (components' stage functions, KFP
artifacts, TrainJobs), MLflow and the store's remote side. It may import every package; none imports it."""
