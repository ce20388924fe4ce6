"""The course: exercises checked against the live guest (``exercises``), the
grader behind ``labkit check`` (``grading``) and the ipywidgets dashboards
(``dashboard``)."""
