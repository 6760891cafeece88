"""The course's late-work rule, as an nbgrader late-submission plug-in.

nbgrader asks its ``AssignLatePenalties`` preprocessor's ``plugin_class`` for the penalty of a
notebook handed in ``total_seconds_late`` after its due date (the assignment's ``duedate`` in
the gradebook, plus any extension). The course config (``nbgrader/nbgrader_config.py``) names
this class::

    c.AssignLatePenalties.plugin_class = "qcourse.grading.late.PercentPerDayPenalty"
    c.PercentPerDayPenalty.percent_per_day = 10.0

so that nbgrader's own tools use the same rule; ``qcourse-course grade`` applies it again to
the final score (after the split run), so the penalty never exceeds what the work earned.
"""

from __future__ import annotations

import math

from nbgrader.plugins import LateSubmissionPlugin
from traitlets import Float

DAY = 86_400.0


def late_penalty(score: float, seconds_late: float, percent_per_day: float,
                 grace_minutes: float = 0.0) -> float:
    """Points taken off ``score`` for work ``seconds_late`` late.

    Each started day after the grace period costs ``percent_per_day`` percent of the score,
    up to all of it: :math:`\\min(1, p\\,\\lceil (t - g) / 1\\,\\mathrm{day} \\rceil / 100)
    \\cdot s` for :math:`t > g`, else 0.
    """
    late = float(seconds_late) - 60.0 * float(grace_minutes)
    if late <= 0 or score <= 0:
        return 0.0
    days = math.ceil(late / DAY)
    return float(score) * min(1.0, days * float(percent_per_day) / 100.0)


class PercentPerDayPenalty(LateSubmissionPlugin):
    """``percent_per_day`` percent of the score off for each started day late (after a grace)."""

    percent_per_day = Float(10.0, help="Percent of the score lost per started day late.").tag(
        config=True)
    grace_minutes = Float(0.0, help="Minutes after the due date that still count as on time."
                          ).tag(config=True)

    def late_submission_penalty(self, student_id: str, score: float,
                                total_seconds_late: float) -> float:
        return late_penalty(score, total_seconds_late, self.percent_per_day, self.grace_minutes)
