import sys

from wandapp.cli import main

sys.exit(main())
