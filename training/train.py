#!/usr/bin/env python
"""Train DOLG: flags -> config -> strategy scope -> trainer.fit -> export.

    python training/train.py --strategy mirrored     # the built-in demo, a few minutes on a CPU

Runs from a source checkout without installing: the repository root is put on
``sys.path``. ``dolg train`` is the same entry point with the same flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dolg_tf.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
