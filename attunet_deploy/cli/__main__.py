"""``python -m attunet_deploy.cli``: the same as the ``attdeploy`` console script."""

from __future__ import annotations

import sys

from attunet_deploy.cli import main

sys.exit(main())
