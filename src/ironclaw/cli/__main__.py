"""``python -m ironclaw.cli``."""

from ironclaw.cli.fast import main

main()
