"""soundwatch: listens to machines and reports when they sound wrong."""

__version__ = "0.1.0"
