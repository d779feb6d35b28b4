"""turnout: switch HTTP traffic between immutable versions of a service."""

__version__ = "0.1.0"
