from loraplex.cli import main

raise SystemExit(main())
