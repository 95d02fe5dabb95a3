"""`xwam serve`: the Policy behind a socket, for robots and simulators (docs/serve.md).

wire.py     msgpack with checked numpy arrays (openpi); the restricted unpickler (the release)
service.py  protocol-independent: observation mapping and checks, the Policy under a lock, statistics
openpi.py   openpi's websocket protocol (openpi-client's WebsocketClientPolicy)
release.py  the X-WAM release's ZeroMQ protocol: a worker and the broker
client.py   RemotePolicy: the Policy's acting interface over the openpi protocol
"""
