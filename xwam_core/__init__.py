"""xwam core: data store, X-WAM model, ANS schedule, training, inference and metrics.

Everything the command line does is importable from here.
"""

__version__ = "0.1.0"
