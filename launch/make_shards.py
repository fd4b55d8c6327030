"""Write WebDataset shards + manifest.parquet from an image folder, a folder of clips, a .parquet file or 'demo'.

    python launch/make_shards.py demo data/digits
    python launch/make_shards.py path/to/images data/mine --test-fraction 0.2 [--mode keep|rgb|l]
    python launch/make_shards.py path/to/clips data/clips --clips [--clip-format frames]
"""

import sys

from maskray.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
