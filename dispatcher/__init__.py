"""Anti-fraud SMS and ringback-tone campaign dispatcher."""

__version__ = "0.1.0"
