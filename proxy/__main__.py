"""`python -m proxy`: the same command line as `turnout`."""

from proxy.cli import main

raise SystemExit(main())
