"""The slicefm Kubeflow pipeline graph, its presets (configs/) and run/compile/submit helpers."""
