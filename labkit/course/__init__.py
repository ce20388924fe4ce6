"""The course: exercises checked against the live guest (``exercises``), the
grader behind ``labkit check`` (``grading``), the cited fact table
(``facts``) and the ipywidgets dashboards (``dashboard``).

``hint("ex3.4")`` reveals the next staged hint of an exercise."""


def hint(exercise_id: str) -> str:
    """The hints of ``exercise_id`` revealed so far, one more per call."""
    from labkit.course.exercises import hint as _hint
    return _hint(exercise_id)
