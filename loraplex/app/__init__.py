"""The application that wires registry, trainer and runtime together (`make demo`)."""
