"""tests/fidelity/cases/ are the suite the fidelity test runs twice, not tests of this project."""

collect_ignore = ["cases"]
