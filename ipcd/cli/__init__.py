"""Command-line entry points: ``ipcd`` (the daemon) and ``ipcctl`` (the client)."""
