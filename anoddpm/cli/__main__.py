import sys

from anoddpm.cli.app import main

sys.exit(main())
