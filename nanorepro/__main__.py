import sys

from nanorepro.cli import main

sys.exit(main())
