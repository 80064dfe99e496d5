"""gunn-exp's Hydra launchers. Hydra accepts a launcher only from the `hydra_plugins` namespace, so
the classes it instantiates live here; their work is in `gunn_exp.launchers`."""
