"""The control plane: an aiohttp application on its own (loopback) listener."""
