"""nbgrader configuration of the qcourse course.

`qcourse-course release` copies this file into the course directory it builds (default
`_build/course`), so `nbgrader` commands and the formgrader run there use it too. The course
directory holds `source/STEM/STEM.ipynb` (one assignment per chapter stem, copied from
`notebooks/`), `release/`, `submitted/`, `autograded/`, `feedback/` and the sqlite gradebook.
"""

import os

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.course_id = "qcourse"
# The course directory is the folder this file is in, wherever it was copied.
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(c.CourseDirectory.root, "gradebook.db")

# What a student finds in a solution cell.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}

# Autograding: a per-cell time limit (a stuck cell is interrupted and scores 0, the next cells
# still run), graded cells deleted by a student are put back, outputs are kept short.
c.Execute.timeout = 30
c.Execute.interrupt_on_timeout = True
c.OverwriteCells.add_missing_cells = True
c.LimitOutput.max_lines = 200
c.LimitOutput.max_traceback = 60

# Late work: each started day after the due date (`qcourse-course due STEM WHEN`) costs 10 % of
# the score, after 15 minutes' grace (qcourse/grading/late.py). nbgrader applies it when it
# autogrades; `qcourse-course grade` applies it again to the final score.
c.AssignLatePenalties.plugin_class = "qcourse.grading.late.PercentPerDayPenalty"
c.PercentPerDayPenalty.percent_per_day = 10.0
c.PercentPerDayPenalty.grace_minutes = 15.0

# Feedback shows the public checks and the error each failing cell raised, never the hidden
# tests or a traceback that would quote them.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "qcourse.grading.SanitizeFeedback",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
]
