"""``python -m qcourse.grading``: the ``qcourse-course`` command (see ``cli.py``)."""

import sys

from qcourse.grading.cli import main

if __name__ == "__main__":
    sys.exit(main())
