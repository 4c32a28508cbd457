import sys

from maskrcnn.cli import main

sys.exit(main())
