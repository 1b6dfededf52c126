"""``python -m lpjax train ...``: the same CLI as the ``lpjax`` console script."""

import sys

from lpjax.cli import main

sys.exit(main())
