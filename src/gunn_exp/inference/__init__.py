"""Using a finished run: load it as a model, predict, evaluate, export."""
