"""`python -m fleet.pki`: the same as `imu-fleet pki`."""

from fleet.pki.cli import main

raise SystemExit(main())
