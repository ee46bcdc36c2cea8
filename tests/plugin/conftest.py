"""projects/ holds suites the plugin's tests run (through pytest), not tests of this project."""

collect_ignore = ["projects"]
