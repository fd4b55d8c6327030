"""Write WebDataset shards + manifest.parquet from an image folder, a folder of clips or videos (PyAV, the ``video``
extra), a .parquet file, or a named source ('demo', 'demo-clips'; ``--list-sources`` lists them all).

    python launch/make_shards.py demo data/digits
    python launch/make_shards.py path/to/images data/mine --test-fraction 0.2 [--mode keep|rgb|l]
    python launch/make_shards.py path/to/clips data/clips --clips [--clip-format frames]
    python launch/make_shards.py path/to/videos data/clips --clips --frame-step 2 --frame-size 64 --clip-length 16
    python launch/make_shards.py demo-clips data/demo_clips
    python launch/make_shards.py --verify data/digits/train   # re-hash every sample against the manifest
    python launch/make_shards.py --list-sources
"""

import sys

from maskray.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
