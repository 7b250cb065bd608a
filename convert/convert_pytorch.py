"""The converter's command line from a checkout: `hiera-jax-convert` (`hiera_jax.convert`).

python convert/convert_pytorch.py --model hiera_base_224 --input hiera_base_224.pth --output ckpt/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hiera_jax.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
