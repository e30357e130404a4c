"""``python -m thalunix``: the same as the ``thalunix`` command."""

import sys

if sys.argv[1:2] == ["--tpm-helper-host"]:
    # The frozen exe's way to run the detached TPM helper host (it has no `python -m`): see tpm.manager.
    from thalunix.tpm.host import main as helper_host

    sys.exit(helper_host(sys.argv[2:]))

from thalunix.cli import main

sys.exit(main())
