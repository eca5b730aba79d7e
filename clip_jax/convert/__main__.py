"""``python -m clip_jax.convert``; see `clip_jax.convert.command_line`."""

import sys

from clip_jax.convert.command_line import main

sys.exit(main())
