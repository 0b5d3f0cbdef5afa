import sys

from anoddpm.cli import main

sys.exit(main())
