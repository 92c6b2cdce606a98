import sys

from p2pfs.cli.main import main

sys.exit(main())
