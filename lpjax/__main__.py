"""``python -m lpjax train ...``: the same CLI as the ``lpjax`` console script."""

import sys

from .cli import main

sys.exit(main())
