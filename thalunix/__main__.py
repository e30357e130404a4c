"""``python -m thalunix``: the same as the ``thalunix`` command."""

import sys

from thalunix.cli import main

sys.exit(main())
