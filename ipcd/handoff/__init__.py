"""fd hand-off: the store (in the master) and what describes an fd."""
