import sys

from ulma.cli import main

sys.exit(main())
