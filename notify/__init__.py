"""What the gateway and the bridge are built on: the publish contract, the client protocol,
Redis names, settings, logs; and the ``notify`` command that runs and operates them."""
