"""ipcd: a local IPC daemon for Linux (echo, chat, fd hand-off)."""

__version__ = "0.1.0"
