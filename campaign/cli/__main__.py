"""``python -m campaign.cli``: the ``pmixed`` command."""

import sys

from campaign.cli import main

sys.exit(main())
