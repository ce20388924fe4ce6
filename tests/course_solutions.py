"""Reference solutions of the course's exercises, read from the instructor
sources (instructor/source/NN-*.ipynb, between ### BEGIN SOLUTION and
### END SOLUTION): they are not in the package or in the student notebooks.
Each entry replaces the source of the exercise cell tagged with its id; every
solution *measures* on the live guest where the question is about the guest,
like a learner should."""

from labkit.course.release import solutions

SOLUTIONS = solutions()


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
