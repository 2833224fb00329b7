"""``python -m fineprune_tf.cli SUBCOMMAND ...``: the ``fineprune`` command without installing."""

import sys

from fineprune_tf.cli import main

sys.exit(main())
