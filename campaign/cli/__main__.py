"""``python -m campaign.cli``: the ``pmixed`` command."""

import sys

from campaign.cli import main

if __name__ == "__main__":  # the processes executor's spawned workers import this module too
    sys.exit(main())
