"""`python -m pipeline.standin ...`: run the stand-in server (see pipeline.standin.server)."""

from pipeline.standin.server import main

raise SystemExit(main())
