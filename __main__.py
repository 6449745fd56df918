"""``python -m privads …``: the same as the ``privads`` command."""

import sys

from privads.cli.main import main

sys.exit(main())
