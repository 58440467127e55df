"""vaelink.frameworks: torch and PIL are detected without being imported, and converted exactly."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import torch
from PIL import Image

from vaelink import frameworks


def test_the_numpy_path_imports_neither_torch_nor_pil() -> None:
    code = (
        "import sys, numpy as np, vaelink\n"
        "z = vaelink.encode(np.zeros((16, 16, 3), np.uint8))\n"
        "vaelink.decode(z, output='png')\n"
        "print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_detection() -> None:
    assert frameworks.is_torch(torch.zeros(1)) and not frameworks.is_torch(np.zeros(1))
    assert frameworks.is_pil(Image.new("RGB", (2, 2))) and not frameworks.is_pil(np.zeros(1))
    assert frameworks.torch_if_imported() is torch
    assert frameworks.array_namespace(torch.zeros(1)) is torch
    assert frameworks.array_namespace(np.zeros(1)) is np


def test_conversions_are_exact() -> None:
    values = torch.tensor([1.0, -2.5, 3.0e38, float("nan")], dtype=torch.bfloat16)
    array = frameworks.to_numpy(values)
    assert array.dtype == ml_dtypes.bfloat16
    assert np.array_equal(array.view(np.uint16), values.view(torch.int16).numpy().view(np.uint16))
    back = frameworks.to_torch(np.arange(6, dtype=np.float32).reshape(2, 3), like=torch.zeros(1))
    assert torch.equal(back, torch.arange(6, dtype=torch.float32).reshape(2, 3))
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert frameworks.pil_to_rgb(rgba).tolist() == [[[10, 20, 30]] * 3] * 2
