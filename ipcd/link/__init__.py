"""The internal link between the master and its workers, as a protocol.

Theory of operation: everything that crosses a worker's channel is a record
with an op (:mod:`ipcd.link.ops`); the records that carry a client's request
or what goes back to clients are small typed values (:mod:`ipcd.link.records`)
with a compact binary form, encoded once where they are made and decoded once
where they arrive, with no JSON on the way. This package is sans-IO: it
imports the public protocol and nothing of the server, so the chat hub and
the fd store, which take :class:`~ipcd.link.records.Sender` and return
:class:`~ipcd.link.records.Out`, never import the server either. The channel
(``ipcd.server.channel``) moves the encoded records and their fds.
"""
