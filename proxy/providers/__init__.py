"""Where a version's instances come from: static endpoints, local processes, Docker containers."""
