"""Message transports the Bytewax adapter reads from and writes to."""
