"""One place for the image every component runs in (the project image with slicefm installed)."""

import os

# Point the components at your registry with SLICEFM_IMAGE at compile/submit time.
BASE_IMAGE = os.environ.get("SLICEFM_IMAGE", "slicefm:0.1.0")
