"""``python -m lowformer`` is the ``lowformer`` command."""
from lowformer.cli import main

raise SystemExit(main())
