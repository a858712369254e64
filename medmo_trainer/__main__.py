"""`python -m medmo_trainer --config <file or URI>`: runs one stage (see `medmo_trainer.entrypoint`)."""

import sys

from medmo_trainer.entrypoint import main

sys.exit(main())
