import sys

from eval.main import main

sys.exit(main())
