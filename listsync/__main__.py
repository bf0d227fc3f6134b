from __future__ import annotations

from listsync.cli import main

raise SystemExit(main())
