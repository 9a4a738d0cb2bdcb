import sys

from persam_dreambooth.cli import main

sys.exit(main())
