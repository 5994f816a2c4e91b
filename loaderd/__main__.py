from loaderd.cli import main

raise SystemExit(main())
