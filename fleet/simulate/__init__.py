"""Synthetic sensor sources used by the fleet simulator."""
