"""Entry point for RunPod Hub, which looks for a `handler.py`.

The handler itself is `higgs_runpod.fronts.runpod.handler`; the image starts it through the
bootstrap (`python -m higgs_runpod.container.bootstrap`), which brings in the runtime first. This
file does the same, so running it is equivalent to the image's command.
"""

import sys

from higgs_runpod.container.bootstrap import main

if __name__ == "__main__":
    sys.exit(main())
