"""bit-transfer: BiT-HyperRule fine-tuning of Big Transfer models on MindSpore."""

import os as _os

# MindSpore logs every missing accelerator plugin as a WARNING on stderr; keep our users'
# terminals readable (errors only) unless they ask for more with GLOG_v themselves.
_os.environ.setdefault("GLOG_v", "3")

__version__ = "0.1.0"
