import sys

from bnserve.cli import main

sys.exit(main())
