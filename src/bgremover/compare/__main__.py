import sys

from bgremover.compare.report import main

sys.exit(main())
