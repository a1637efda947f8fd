"""Training: one loop for every method (``trainer``) and its loggers; what is trained lives in
:mod:`difflab.methods`, the run folder it writes in :mod:`difflab.runs.data`."""
