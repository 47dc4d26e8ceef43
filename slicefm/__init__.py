"""slicefm: CT scans -> slice-level foundation-model embeddings -> patient-level predictions."""

__version__ = "0.1.0"
