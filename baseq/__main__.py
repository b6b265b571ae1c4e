"""``python -m baseq ...`` (and ``torchrun --nproc-per-node N -m baseq quantize ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
