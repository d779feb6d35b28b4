"""`turnout serve`: the supervisor process (wiring, worker slots, restarts, rolling restarts), one worker's
main, and seeding the store from a route file."""
