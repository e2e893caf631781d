"""Integration tests: the relay over real sockets with real clients and upstreams."""
