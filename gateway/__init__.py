"""credgate: a secrets and service-connector gateway."""

__version__ = "0.1.0"
