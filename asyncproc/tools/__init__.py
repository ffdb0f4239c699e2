"""What surrounds the daemon: the batch commands, the demo, the stand-in gateway, the
benchmark. They use the daemon's value types, config and transports (and
asyncproc.client), never its supervisor, pool or workers."""
