"""Must fail type checking: `modle` is not an option."""

import numpy as np

import vaelink

vaelink.encode(np.zeros((1, 64, 64, 3), np.uint8), modle="sdxl")
