"""An empty module for tests/test_parallel.py to preload."""
