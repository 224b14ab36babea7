import sys

from sealnet.cli import main

sys.exit(main())
