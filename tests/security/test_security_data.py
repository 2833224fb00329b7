"""Hostile or broken user data (rows 8, 11, 12): one clear error before anything is decoded,
nothing written, symlinks never followed out of the data folder."""

import pickle
import zipfile

import hostile
import numpy as np
import pytest
from PIL import Image

from fineprune_tf.data import DataFormatError
from fineprune_tf.data.user import DataLimits, load_user_data

SHAPE = (4, 4, 1)


def load(path, **kwargs):
    return load_user_data(path, SHAPE, num_classes=2, **kwargs)


def image_folder(root, extension=".png"):
    for label, value in (("a", 20), ("b", 230)):
        (root / label).mkdir(parents=True)
        for index in range(2):
            Image.new("L", (4, 4), color=value + index).save(root / label / f"{index}{extension}")
    return root


def test_broken_npz_files_have_one_clear_error(watched):
    root = watched.root
    (root / "empty.npz").write_bytes(b"")
    np.save(root / "array.npy", np.zeros(3))
    (root / "array.npy").rename(root / "array.npz")
    x, y = hostile.clean_arrays()
    np.savez(root / "complex.npz", x=x.astype(np.complex64) + 1j, y=y)
    hostile.npz_declaring(root / "bomb.npz", (10**6, 10**4))
    with zipfile.ZipFile(root / "pickled.npz", "w") as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|O", "fortran_order": False, "shape": (1,)}
            )
            member.write(pickle.dumps([1]))
    watched.freeze()
    for name, words in [
        ("empty.npz", "empty file"),
        ("array.npz", "single .npy array"),
        ("complex.npz", "complex-valued x"),
        ("bomb.npz", "need more than"),
        ("pickled.npz", "Python objects"),
    ]:
        with pytest.raises(DataFormatError, match=words) as caught:
            load(root / name)
        assert "\n" not in str(caught.value)
    watched.assert_unchanged()


def test_huge_images_are_refused_from_their_header(watched):
    folder = image_folder(watched.root / "data")
    hostile.png_declaring(folder / "a" / "huge.png", 20_000, 20_000)  # 400 megapixels
    watched.freeze()
    with pytest.raises(DataFormatError, match="huge.png: .*over the limit of 50,000,000 pixels"):
        load(folder)
    (folder / "a" / "huge.png").unlink()
    hostile.png_declaring(folder / "a" / "big.png", 9_000, 9_000)  # under PIL's own limit
    watched.freeze()
    with pytest.raises(DataFormatError, match="9000x9000 pixels, over the limit"):
        load(folder)
    with pytest.raises(DataFormatError, match="need more than"):
        load(folder, limits=DataLimits(max_bytes=100))
    watched.assert_unchanged()


def test_symlinks_out_of_the_data_folder_are_not_followed(watched):
    outside = watched.root / "outside"
    image_folder(outside)
    folder = image_folder(watched.root / "data")
    (folder / "a" / "stolen.png").symlink_to(outside / "a" / "0.png")
    (folder / "c").symlink_to(outside / "b")
    watched.freeze()
    with pytest.raises(DataFormatError, match="symbolic link .* outside the data folder"):
        load(folder)
    (folder / "a" / "stolen.png").unlink()
    (folder / "c").unlink()
    (folder / "a" / "inside.png").symlink_to(folder / "a" / "0.png")
    assert len(load(folder).y) == 5  # a link that stays inside the folder is fine


def test_uppercase_extensions_and_benign_controls_load(watched):
    folder = image_folder(watched.root / "data", ".PNG")
    x, y = hostile.clean_arrays()
    with open(watched.root / "clean.NPZ", "wb") as handle:
        np.savez(handle, x=x, y=y)
    watched.freeze()
    assert load(folder).x.shape == (4, *SHAPE)
    assert load(watched.root / "clean.NPZ").x.shape == (60, *SHAPE)
    watched.assert_unchanged()
