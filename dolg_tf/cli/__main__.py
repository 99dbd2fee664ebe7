"""``python -m dolg_tf.cli`` == ``dolg`` (used to start subprocesses with the same interpreter)."""

import sys

from dolg_tf.cli import main

sys.exit(main())
