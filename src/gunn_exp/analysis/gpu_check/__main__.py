"""`python -m gunn_exp.analysis.gpu_check`: every part runs; the exit status says whether all of
them passed (for CI and `make`)."""

import sys

from gunn_exp.analysis.gpu_check.run import main

parts = main()["parts"].values()
sys.exit(0 if all(part["status"] == "ok" for part in parts) else 1)
