"""`python -m slicefm <verb>`: the same CLI tree as the `slicefm` command (slicefm.edge.cli)."""

import sys

from slicefm.edge.cli import main

sys.exit(main())
