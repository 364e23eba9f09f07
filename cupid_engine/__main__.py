import sys

from cupid_engine.cli import main

# Guarded: spawned worker processes (render and Ray helpers) re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
