"""Command-line entry points: ``ipcd`` (the daemon) and ``ipcctl`` (the client)."""

import gc


def run_ipcctl() -> None:
    """The ``ipcctl`` console script: :func:`ipcd.cli.ipcctl.main`, started fast.

    Scripts call ``ipcctl`` in loops, so its start-up is most of what a call
    costs, and the cyclic garbage collector is a good part of that: the
    imports (click above all) allocate enough to set off collections that
    find nothing, and the collection at exit walks every module again. So
    collection is off while importing, and what the imports made (modules,
    classes, functions: it lives until exit anyway) is frozen where no
    collection looks before collection is turned back on for the command,
    which may run for hours (``listen``, ``chat``).
    """
    gc.disable()
    from ipcd.cli.ipcctl import main  # noqa: PLC0415 - imported with collection off

    gc.freeze()
    gc.enable()
    main()
