"""``python -m ironclaw.cli``."""

from ironclaw.cli.main import main

main()
