"""`python -m uproxy` runs the command line."""

import sys

from uproxy.cli import main

sys.exit(main())
