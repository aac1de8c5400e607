"""ipcd benchmarks: every figure beside a baseline measured in the same run.

Run ``python -m benchmarks`` (``make bench``); ``--help`` lists the options.

- :mod:`benchmarks.echo`: echo throughput and latency, stream and datagram,
  of ipcd against :mod:`benchmarks.rawecho`, a framing-free echo server
  pre-forked over the same number of processes.
- :mod:`benchmarks.fanout`: chat fan-out, one publisher to 10 and 100
  subscribers, against Redis pub/sub over a Unix socket.
- :mod:`benchmarks.loop_choice`: one framed echo server on ``selectors`` and
  on asyncio, the measurement behind the daemon's event-loop choice.
- :mod:`benchmarks.load`: the clients; :mod:`benchmarks.servers`: server
  processes; :mod:`benchmarks.report`: tables and JSON.
"""

from pathlib import Path

#: The repository root: the working directory of every helper process, so
#: ``python -m benchmarks.*`` finds this package wherever the run started.
ROOT = Path(__file__).resolve().parent.parent
