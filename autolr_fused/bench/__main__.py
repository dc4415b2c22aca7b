import sys

from autolr_fused.bench.run import main

sys.exit(main())
