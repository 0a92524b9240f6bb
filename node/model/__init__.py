"""Model artefacts: the built-in reference TCN encoder used by tests and the demo."""
