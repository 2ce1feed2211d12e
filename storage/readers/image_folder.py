"""Class-per-folder image trees: Tiny-ImageNet, ImageNet-100, ImageNet-1K.

Layout under ``data.path``: ``train/<class>/…/<image>`` and ``val/<class>/…/<image>`` (or
``test/``); any depth below the class folder (Tiny-ImageNet keeps its images in
``<class>/images/``). Tiny-ImageNet's own ``val/`` (one ``images/`` folder and
``val_annotations.txt``) is read through its annotation file. Classes are the train
split's folder names, sorted.

Images are decoded in parallel by Ray Data (``read_binary_files``, then Pillow in
``map_batches``), resized so the shorter side is ``data.image_size`` and centre-cropped to
a square, and written into the Zarr dataset store chunk by chunk: the driver holds the
file list and one chunk, never the set. A file Pillow cannot decode stops the ingest with
one line naming it, and nothing is committed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings

import numpy as np

from storage.readers.base import DataFileError, Reader, subset_positions

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEST_FOLDERS = ("val", "test")
TINY_IMAGENET_ANNOTATIONS = "val_annotations.txt"


def _images_under(folder: str) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        found += [os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    return found


def _class_folders(split_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _has_image(folder: str) -> bool:
    """Whether any image lies under ``folder``; stops at the first (ImageNet has 1,300 a class)."""
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(EXTENSIONS) for f in files):
            return True
    return False


def decode_image(data: bytes, path: str, size: int) -> np.ndarray:
    """One file's bytes to uint8 (3, size, size): shorter side to ``size``, centre crop."""
    from PIL import Image, UnidentifiedImageError

    bound = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below instead
            image = Image.open(io.BytesIO(data))  # reads the header only
        with image:
            # A small file can declare a huge image (a 30000² PNG compresses to kilobytes);
            # decoding it would take gigabytes. Pillow's own check only warns below twice
            # its bound, so the bound is applied here.
            width, height = image.size
            if bound and width * height > bound:
                raise DataFileError(f"{path}: {width}x{height} = {width * height:,} pixels, above the {bound:,} "
                                    f"pixels an image may have (Pillow's decompression-bomb bound); shrink or "
                                    f"remove it")
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                   Image.BILINEAR)
    except DataFileError:
        raise
    except Image.DecompressionBombError as e:  # past twice the bound Pillow refuses while opening
        declared = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise DataFileError(f"{path}: {pixels}, above the {bound:,} pixels an image may have (Pillow's "
                            f"decompression-bomb bound); shrink or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataFileError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or remove it") from None
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1)


class ImageFolder(Reader):
    streaming = True

    def test_dir(self, path: str) -> str | None:
        for name in TEST_FOLDERS:
            if os.path.isdir(os.path.join(path, name)):
                return os.path.join(path, name)
        return None

    def problems(self, path):
        train = os.path.join(path, "train")
        if not os.path.isdir(train):
            return [f"{path}: no train/ folder (expected train/<class>/<images> and val/<class>/<images>)"]
        if not _class_folders(train):
            return [f"{train}: no class folders"]
        test = self.test_dir(path)
        if test is None:
            return [f"{path}: no val/ or test/ folder beside train/"]
        # A class folder without images would be a class the model never sees or is never
        # tested on, silently.
        roots = [train] if os.path.isfile(os.path.join(test, TINY_IMAGENET_ANNOTATIONS)) else [train, test]
        for root in roots:
            for name in _class_folders(root):
                if not _has_image(os.path.join(root, name)):
                    return [f"{os.path.join(root, name)}: a class folder with no images ({', '.join(EXTENSIONS)}); "
                            f"add its images or remove it"]
        return []

    def classes(self, path: str) -> list[str]:
        return _class_folders(os.path.join(path, "train"))

    def listing(self, path: str, split: str) -> tuple[list[str], np.ndarray]:
        """The split's image files in a fixed order, and their labels."""
        problems = self.problems(path)
        if problems:
            raise DataFileError(problems[0])
        index = {name: i for i, name in enumerate(self.classes(path))}
        root = os.path.join(path, "train") if split == "train" else self.test_dir(path)
        annotations = os.path.join(root, TINY_IMAGENET_ANNOTATIONS)
        if split == "test" and os.path.isfile(annotations):
            return self._annotated(root, annotations, index)
        files, labels = [], []
        for name in _class_folders(root):
            if name not in index:
                raise DataFileError(f"{os.path.join(root, name)}: class {name!r} has no folder in train/")
            found = _images_under(os.path.join(root, name))
            files += found
            labels += [index[name]] * len(found)
        if not files:
            raise DataFileError(f"{root}: no image files ({', '.join(EXTENSIONS)})")
        return files, np.asarray(labels, dtype=np.int64)

    def _annotated(self, root: str, annotations: str, index: dict[str, int]) -> tuple[list[str], np.ndarray]:
        files, labels = [], []
        with open(annotations) as f:
            for number, line in enumerate(f, 1):
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in index:
                    raise DataFileError(f"{annotations}: line {number}: expected '<file>\\t<class of train/>'")
                files.append(os.path.join(root, "images", parts[0]))
                labels.append(index[parts[1]])
        return files, np.asarray(labels, dtype=np.int64)

    def digest(self, path):
        # Names, sizes and modification times, not the bytes: reading ImageNet's 150 GB to key
        # it would cost more than decoding it. A replaced file changes its size or mtime.
        h = hashlib.sha256()
        for split in ("train", "test"):
            files, labels = self.listing(path, split)
            for file, label in zip(files, labels):
                st = os.stat(file)
                h.update(f"{split}\0{os.path.relpath(file, path)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def selected(self, path: str, split: str, limit: int | None, seed: int) -> tuple[list[str], np.ndarray]:
        files, labels = self.listing(path, split)
        keep = subset_positions(len(files), limit, seed)
        if keep is not None:
            files, labels = [files[i] for i in keep], labels[keep]
        return files, labels

    def decoded_batches(self, files: list[str], size: int, batch_rows: int):
        """(paths, uint8 (B, 3, size, size)) batches, decoded in parallel by Ray Data, in file order.

        A file that cannot be decoded comes back as its error message rather than as an
        exception: Ray would wrap the exception in its own and lose the message on the way to
        the driver, which raises it here, naming the file (and how many more in the batch).
        """
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows are written in the listing's order

        def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            images, errors = [], []
            for data, path in zip(batch["bytes"], batch["path"]):
                try:
                    images.append(decode_image(data, path, size))
                    errors.append("")
                except DataFileError as e:
                    images.append(np.zeros((3, size, size), dtype=np.uint8))
                    errors.append(str(e))
            return {"path": batch["path"], "image": np.stack(images), "error": np.asarray(errors, dtype=object)}

        data = ray.data.read_binary_files(files, include_paths=True)
        for batch in data.map_batches(decode, batch_format="numpy").iter_batches(
                batch_size=batch_rows, batch_format="numpy"):
            failed = [e for e in batch["error"] if e]
            if failed:
                more = f" (and {len(failed) - 1} more files in the same batch)" if len(failed) > 1 else ""
                raise DataFileError(failed[0] + more)
            yield batch["path"], batch["image"]
