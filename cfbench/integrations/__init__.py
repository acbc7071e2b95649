"""Bridges to other continual-learning libraries (optional extras; importing this package imports
none of them)."""
