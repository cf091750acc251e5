from lorachunk._cli import main

raise SystemExit(main())
