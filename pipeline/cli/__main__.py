"""``python -m pipeline.cli``: the ``raymask`` command."""

import sys

from pipeline.cli.main import main

sys.exit(main())
