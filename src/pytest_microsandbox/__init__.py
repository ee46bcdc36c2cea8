"""pytest-microsandbox: run tests in microVMs."""
