"""The bottom layer: formats and utilities every package may import (the artifact store, the slice-stack
format, the config base, the process pool)."""
