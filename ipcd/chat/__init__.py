"""Local chat: the hub (in the master) and its wire helpers."""
