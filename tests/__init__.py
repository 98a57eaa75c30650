"""CPU tests on tiny random models and the bundled zoo."""
