"""`python -m graphcache ...` is the `graphcache` command."""

from .cli import main

raise SystemExit(main())
