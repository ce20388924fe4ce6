"""nbgrader configuration of the labkit course (copy it to your nbgrader course directory).

The solution/hidden-test markers, the code stub and the execution timeout come from
labkit.course.release.configure, the same values `labkit course release` uses, so
`nbgrader generate_assignment` releases exactly the notebooks in notebooks/.
"""

from labkit.course.release import configure

c = get_config()  # noqa: F821 (nbgrader provides get_config)
configure(c)

# Set these for your course (see docs/instructor.md):
c.CourseDirectory.course_id = "labkit"
# c.Exchange.root = "/srv/nbgrader/exchange"     # a directory every student can write to (mode 0777)
