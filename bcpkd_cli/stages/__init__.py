"""One module per pipeline stage; each `run(...)` reads a Recipe and returns its artifact's path."""
