"""Write WebDataset shards + manifest.parquet from an image folder, a .parquet file or 'demo'.

    python launch/make_shards.py demo data/digits
    python launch/make_shards.py path/to/images data/mine --test-fraction 0.2
"""

import sys

from maskray.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
