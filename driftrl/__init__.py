"""driftrl."""
