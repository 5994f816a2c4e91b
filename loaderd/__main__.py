from loaderd.cli.loaderd import entry

entry()
