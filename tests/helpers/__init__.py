"""What the test modules share: `train` (configs, runs and processes of train.py), `reference`
(the official, timm and transformers models to compare with), `hub` (offline hub caches)."""
