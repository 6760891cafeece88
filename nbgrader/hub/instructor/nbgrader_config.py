"""nbgrader in an instructor's server on the course Hub (nbgrader/hub/jupyterhub_config.py).

The formgrader and the nbgrader commands work on the course directory ``~/qcourse``, made by
``qcourse-course release --course ~/qcourse``; its own config (the repository's
``nbgrader/nbgrader_config.py``, copied there: late rule, limits, feedback) is loaded too.
"""

import os

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

COURSE = os.path.expanduser(os.environ.get("QCOURSE_COURSE_DIR", "~/qcourse"))
c.CourseDirectory.course_id = "qcourse"
c.CourseDirectory.root = COURSE
c.Exchange.root = os.environ.get("QCOURSE_EXCHANGE", "/srv/nbgrader/exchange")
if os.path.isfile(os.path.join(COURSE, "nbgrader_config.py")):
    load_subconfig(os.path.join(COURSE, "nbgrader_config.py"))  # noqa: F821 - from traitlets
