"""The daemon: a master that accepts and a pool of pre-forked workers."""
