"""``python -m gradsketch.cli``."""

from . import main

main()
