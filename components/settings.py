"""Cluster settings read when the pipeline is compiled (environment variables of `make compile` / `submit`)."""

import os

# The image every component runs in: the project image, one image for CPU and GPU nodes (its torch is the CUDA
# build, docker/Dockerfile.deps). Point the components at your registry with SLICEFM_IMAGE.
BASE_IMAGE = os.environ.get("SLICEFM_IMAGE", "slicefm:0.1.0")
# Secrets of type kubernetes.io/dockerconfigjson for a private registry, comma-separated (none by default).
IMAGE_PULL_SECRETS = [s.strip() for s in os.environ.get("SLICEFM_IMAGE_PULL_SECRETS", "").split(",") if s.strip()]
# Size limit of the in-memory /dev/shm of GPU steps (DataLoader workers pass batches through it); the memory
# counts against the pod's limit.
SHM_SIZE = os.environ.get("SLICEFM_SHM_SIZE", "16Gi")
# At most this many extract shards of one embedding set run at once (ParallelFor parallelism; 0 = no cap).
EXTRACT_PARALLELISM = int(os.environ.get("SLICEFM_EXTRACT_PARALLELISM", "4"))
# A PersistentVolumeClaim the ingest steps mount to keep fetched data (dvc pull, s3://) between steps and runs
# ("" = each ingest step fetches into a temporary directory of its pod).
DATA_PVC = os.environ.get("SLICEFM_DATA_PVC", "")
DATA_WORKSPACE = "/mnt/slicefm-data"
