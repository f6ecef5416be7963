"""genki: event-sourced health points and wearable vitals."""

__version__ = "0.1.0"
