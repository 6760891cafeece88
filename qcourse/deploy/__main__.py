"""``python -m qcourse.deploy``: see :func:`qcourse.deploy.cli.main`."""

import sys

from qcourse.deploy.cli import main

sys.exit(main())
