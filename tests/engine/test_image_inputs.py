"""What Predictor accepts as an image: a file and the same file opened with PIL give the same pixels."""

import numpy as np
import torch
from PIL import Image

from maskrcnn.engine.predictor import to_image_tensor


def test_a_pil_image_honours_its_exif_orientation_as_its_file_does(tmp_path):
    stored = Image.new("RGB", (20, 40), (0, 0, 255))  # 20 wide, 40 tall as stored
    stored.paste((255, 0, 0), (0, 0, 20, 10))  # a red band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": shown 40 wide, 20 tall
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    from_file = to_image_tensor(tmp_path / "phone.jpg")
    opened = to_image_tensor(Image.open(tmp_path / "phone.jpg"))
    assert from_file.shape == opened.shape == (3, 20, 40)
    assert torch.equal(from_file, opened)
    assert opened[0, :, -5:].float().mean() > 200  # the band is on the right, as a viewer shows it
    # an image without the tag (or already turned) is taken as it is
    plain = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    assert torch.equal(to_image_tensor(plain), torch.from_numpy(np.asarray(plain)).permute(2, 0, 1))
