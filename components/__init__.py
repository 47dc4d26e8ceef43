"""Thin Kubeflow components, one per stage; the logic lives in the slicefm package."""
