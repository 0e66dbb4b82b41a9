"""The process tree: the service twistd runs, workers, shared listening sockets."""
