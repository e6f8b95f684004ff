"""What predict's INPUT arguments name: files, directories, glob patterns and `-` (paths on stdin) as
`Inputs`, their labels when the folders are named like the model's classes, and a `Split` over the files.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_transfer.data.folder import IMAGE_EXTENSIONS, list_images
from bit_transfer.data.split import FileStore, Split
from bit_transfer.errors import DataError, UsageError
from bit_transfer.system.filekinds import special_kind

GLOB_CHARS = "*?["


@dataclass
class Inputs:
    """The image files to predict, in order, and their labels when their folders name the classes."""

    paths: list[str]
    folders: list[tuple[str, int, int]] = field(default_factory=list)  # (directory, first, end) of each listed dir
    labels: np.ndarray | None = None  # model class index per path
    labelled_by: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # FIFOs, devices, sockets: named, never opened

    @property
    def name(self) -> str:
        """A short name for a report directory: the folder's name, else 'images'."""
        if len(self.folders) == 1:
            return Path(os.path.abspath(self.folders[0][0])).name or "images"
        return "images"


def collect_inputs(items: list[str], stdin=None, say=None) -> Inputs:
    """Files, directories (recursive, sorted), glob patterns and `-` (paths on stdin), in order, once each.

    A FIFO, device or socket among them is skipped and named through `say` (default: stderr), never
    opened: reading a FIFO would wait forever.
    """
    collector = _Collector(say or (lambda line: print(line, file=sys.stderr)))
    for text, from_stdin in _expand_stdin(items, stdin):
        collector.item(text, from_stdin)
    found = collector.found
    if not found.paths and found.skipped:
        raise DataError(f"no images to predict: {len(found.skipped)} input(s) are not image files (named above); "
                        "give image files, directories or glob patterns")
    if not found.paths:
        raise DataError("no images to predict: stdin gave no paths; pipe one path per line, e.g. "
                        "find photos -name '*.jpg' | bit-transfer predict MODEL -")
    return found


class _Collector:
    """What collect_inputs has found so far, each path once (by its real path)."""

    def __init__(self, say):
        self.found, self.seen, self.say = Inputs([]), set(), say

    def item(self, text: str, from_stdin: bool) -> None:
        if os.path.isdir(text):
            folder = str(Path(text))  # the form list_images builds paths from
            start = len(self.found.paths)
            images = self.listed(Path(folder))
            if not images:
                raise DataError(f"no images under {text} (files ending in {', '.join(IMAGE_EXTENSIONS)}); "
                                "give image files or a folder that holds some")
            self.add(images)
            self.found.folders.append((folder, start, len(self.found.paths)))
        elif (kind := special_kind(text)) is not None:
            self.skip(text, kind)
        elif os.path.isfile(text):
            self.add([text])
        elif not from_stdin and any(c in text for c in GLOB_CHARS):
            self.pattern(text)
        else:
            where = " (a path read from stdin)" if from_stdin else ""
            raise DataError(f"input {text} not found{where}; give image files, directories, glob patterns, "
                            "or - to read paths from stdin")

    def pattern(self, text: str) -> None:
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise DataError(f"no file matches {text!r}; check the pattern (quote it so the shell leaves it to "
                            "predict, e.g. 'photos/**/*.jpg')")
        for m in matches:
            if os.path.isdir(m):
                self.add(self.listed(Path(m)))
            elif (kind := special_kind(m)) is not None:
                self.skip(m, kind)
            else:
                self.add([m])

    def add(self, paths: list[str]) -> None:
        for p in paths:
            key = os.path.realpath(p)
            if key not in self.seen:
                self.seen.add(key)
                self.found.paths.append(p)

    def skip(self, path: str, kind: str) -> None:
        key = os.path.realpath(path)
        if key not in self.seen:  # named once, however many inputs lead to it
            self.seen.add(key)
            self.found.skipped.append(path)
            self.say(f"skipped {path}: {kind}, not an image file")

    def listed(self, folder: Path) -> list[str]:
        skipped: list[tuple[str, str]] = []
        images = list_images(folder, skipped)
        for path, kind in skipped:
            self.skip(path, kind)
        return images


def _expand_stdin(items: list[str], stdin) -> Iterator[tuple[str, bool]]:
    read = False
    for item in items:
        if item != "-":
            yield item, False
            continue
        if read:
            raise UsageError("- (paths on stdin) is given twice; give it once")
        read = True
        for line in (stdin or sys.stdin):
            line = line.rstrip("\r\n")
            if line.strip():
                yield line, True


def label_folders(inputs: Inputs, class_names: list[str] | None) -> Inputs:
    """Labels from the image-folder layout: when every input is a folder whose sub-folders are all
    named like classes of the model (and it holds no loose images), each image's class is its folder's."""
    if not class_names or not inputs.folders:
        return inputs
    index = {c: i for i, c in enumerate(class_names)}
    covered = sum(end - start for _, start, end in inputs.folders)
    labels = np.full(len(inputs.paths), -1, np.int64)
    for folder, start, end in inputs.folders:
        subs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        loose = [p for p in inputs.paths[start:end] if os.path.dirname(p) == folder]
        unknown = [s for s in subs if s not in index]
        if not subs or loose or unknown:
            if subs and len(unknown) < len(subs):
                why = f"sub-folder(s) {', '.join(unknown[:3])} are not classes of the model" if unknown else \
                    "it holds images outside the class folders"
                inputs.notes.append(f"{folder} is not labelled by its folders: {why}")
            return inputs
        prefix = len(os.path.join(folder, ""))
        for i in range(start, end):
            labels[i] = index[inputs.paths[i][prefix:].split(os.sep, 1)[0]]
    if covered != len(inputs.paths):  # files or patterns besides the folders: no labels for those
        inputs.notes.append("labels ignored: some inputs are not class folders")
        return inputs
    inputs.labels = labels
    names = ", ".join(f for f, _, _ in inputs.folders[:3]) + (" ..." if len(inputs.folders) > 3 else "")
    inputs.labelled_by = f"the class folders of {names}"
    return inputs


def files_split(paths: list[str], name: str = "inputs") -> Split:
    """A Split over image files whose label is each file's position (the pipeline hands it back)."""
    n = len(paths)
    return Split(FileStore(list(paths), name), np.arange(n), np.arange(n), name, skip_corrupt=True)
