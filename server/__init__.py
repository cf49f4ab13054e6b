"""Real-time AI customer-support chat server."""

__version__ = "1.0.0"
