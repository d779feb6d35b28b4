"""`turnout serve`: the supervisor process (main: wiring; workers: slots, restarts, rolling restart), one
worker process's main (worker), seeding the store from a route file (seed), and what they share (process).

Design rule: the supervisor wires; every route table is installed by proxy.control.watcher."""
