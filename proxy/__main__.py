"""`python -m proxy` runs the `connect-proxy` command."""

from __future__ import annotations

import sys

from proxy.main import main

if __name__ == "__main__":
    sys.exit(main())
