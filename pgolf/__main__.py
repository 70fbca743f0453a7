"""``python -m pgolf ...`` (also ``torchrun ... -m pgolf train ...``)."""

import sys

from pgolf.cli import main

sys.exit(main())
