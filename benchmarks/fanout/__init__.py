"""Chat fan-out: one publisher, many subscribers; ipcd rooms beside Redis pub/sub.

Theory of operation
-------------------
One publisher connection pipelines small messages to a room (ipcd: SAY
frames; Redis: PUBLISH over RESP) keeping at most ``WINDOW`` unanswered;
10, then 100, subscribers spread over two subscriber processes count what
arrives. The clients are C (``clients``), so that they cost far less than
either server and the figure is the server's. Both servers run during the
whole scenario and take turns (``scenario``). The figure is *deliveries
per second*: messages received, summed over all subscribers, inside a
fixed window after a warm-up, with the servers' CPU per delivery beside it.

Every delivery is checked: each subscriber must see every message exactly
once and in sequence order (ipcd's room ``seq``; Redis has none, so the
payload's own sequence number), and after the run every subscriber must
have the last message. Gaps, repeats and misses are reported as problems.

The loop is closed: subscriber processes publish, in a small shared file,
the lowest sequence number all their subscribers have reached, and the
publisher never runs more than ``MAX_LAG`` messages ahead of it. Without
that, a server faster than the subscribers would queue without bound until
it cut them off (ipcd's ``max_outbuf``, Redis's ``client-output-buffer-limit
pubsub``), and the figure would say nothing.

Latency is measured apart from throughput, on an unloaded server: after the
window the publisher waits for every subscriber to catch up, then sends
``PACED_RATE`` messages a second, each carrying its ``CLOCK_MONOTONIC`` send
time (the clock is system-wide); a subscriber stamps each recv() it decodes
them from, so a figure includes the whole path to user space of the last
subscriber served.
"""

from benchmarks.fanout.scenario import scenario

__all__ = ["scenario"]
