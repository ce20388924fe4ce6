"""Reference solutions of the course's exercises, read from the instructor
sources (instructor/source/NN-*.ipynb, between ### BEGIN SOLUTION and
### END SOLUTION): they are not in the package or in the student notebooks.
Each entry replaces the source of the exercise cell tagged with its id; every
solution *measures* on the live guest where the question is about the guest,
like a learner should.

Which test executes which notebook against a live guest, once each: the
summative grader's tests (tests/test_summative.py) grade the reference
solutions of ``GRADER_SOLUTIONS`` and ``GRADER_TWO_KERNELS`` to full marks
with no cell error, and the blank ``GRADER_BLANKS`` to zero with no cell
error, through ``labkit course grade`` (the same judge as ``labkit check``);
tests/test_check.py runs ``labkit check`` over the other notebooks, blank and
with the reference solutions (``check_notebooks``). Executing a notebook
costs up to two minutes, so none is executed twice for the same assertions."""

from labkit.course.release import solutions

SOLUTIONS = solutions()

GRADER_SOLUTIONS = ("00", "04")                   # alice, in the grader's class run
GRADER_BLANKS = ("00", "04")                      # bob, in the same run
GRADER_TWO_KERNELS = {"09": "7.3", "06": "6.12"}  # notebook -> its companion's kernel, graded alone


def check_notebooks(paths: list, by_the_grader) -> list:
    """The notebooks of ``paths`` (notebooks/NN-*.ipynb) that the grader's tests
    do not execute (``by_the_grader``: their numbers): ``labkit check`` runs them."""
    return [p for p in paths if p.name[:2] not in set(by_the_grader)]


def fill(nb) -> list[str]:
    """Put the reference solutions into the exercise cells of ``nb`` (in place);
    returns the ids filled."""
    done = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and "exercise" in tags:
            for t in tags:
                if t in SOLUTIONS:
                    cell.source = SOLUTIONS[t]
                    done.append(t)
    return done
