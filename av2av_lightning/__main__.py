import sys

from av2av_lightning.cli import main

sys.exit(main())
