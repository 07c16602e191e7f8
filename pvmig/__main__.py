import sys

from pvmig.cli.main import main

sys.exit(main())
