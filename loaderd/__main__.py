from loaderd.cli.loaderd import main

raise SystemExit(main())
