from cpsc_ray.cli import main

raise SystemExit(main())
