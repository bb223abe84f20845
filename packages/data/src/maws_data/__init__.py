"""maws_data."""

# What the build's tasks import first: a worker pool imports them while the driver starts (runner.py).
# Here, not in build.py, so that the CLI can start the pool before it imports anything heavy.
WORKER_MODULES = ("maws_data.plan", "maws_data.textpass", "maws_data.imagepass")
