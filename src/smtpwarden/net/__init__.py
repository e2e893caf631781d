"""The I/O shell: sockets, timers and signals around the sans-I/O core."""
