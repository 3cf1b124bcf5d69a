import sys

from jaxcls.cli import main

sys.exit(main())
