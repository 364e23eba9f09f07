import sys

from cupid_engine.cli import main

sys.exit(main())
