"""``python -m cacovid_cli``: the same command as the ``cacovid-rl`` console script."""

import sys

from cacovid_cli.main import main

if __name__ == "__main__":  # importing the module (pkgutil walks, docs tools) must not run the command
    sys.exit(main())
