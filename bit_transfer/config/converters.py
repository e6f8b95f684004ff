"""Converters: a recipe value as written (YAML or `--set`) -> its typed value, or ValueError saying
what was expected. `key` declares a recipe key with its default, converter and one-line doc."""

from __future__ import annotations

import math
import re
from dataclasses import field
