from mmwatchd.cli import main

raise SystemExit(main())
