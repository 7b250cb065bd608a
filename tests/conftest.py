"""Test set-up shared by every test module.

Eight simulated CPU devices, so sharding tests see a small "pod"; this must happen before jax is
imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
