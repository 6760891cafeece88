"""nbgrader in a student's server on the course Hub (nbgrader/hub/jupyterhub_config.py).

The assignment list fetches from and submits to the course's exchange; nbgrader takes the
student's id from the account the server runs as.
"""

import os

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "qcourse"
c.Exchange.root = os.environ.get("QCOURSE_EXCHANGE", "/srv/nbgrader/exchange")
