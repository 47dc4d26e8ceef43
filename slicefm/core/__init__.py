"""The bottom layer: formats and utilities every package may import (the artifact store)."""
