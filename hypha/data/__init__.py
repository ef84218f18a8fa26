"""hypha.data: the data node's datasets (prepare, read, verify) and the scheduler's slice tracker.

``python -m hypha.data prepare text|images ...`` turns a corpus into a *dataset*: a directory of
SafeTensors *slices* that a data node streams to workers one at a time, and that the scheduler
hands out with :class:`SliceTracker` (AVAILABLE → ASSIGNED → USED, per epoch).

    python -m hypha.data prepare text --builtin python-stdlib --out datasets     # no download
    python -m hypha.data prepare text --input corpus/ --name books --out datasets
    python -m hypha.data prepare images --input mnist.npz --name mnist --out datasets
    python -m hypha.data verify datasets/books

Built-in corpora (``--builtin``): ``python-stdlib`` (~4 MiB) and ``python-stdlib-small``
(~512 KiB): the top-level ``*.py`` modules of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), sorted by name, taken while the total fits the budget;
the same selection on every install of the same Python version.

Dataset layout (format version 1)::

    NAME/manifest.json
    NAME/slice-00000.safetensors
    NAME/slice-00001.safetensors ...

A slice is a plain SafeTensors file (no ``__metadata__``) holding, with ``n`` examples:

* text: ``tokens``: uint8 ``[n, seq_len + 1]``. Byte-level tokens (vocab 256); the corpus is
  the input files' bytes in order, each followed by byte 0 (end of document). Sequence ``k`` of
  the dataset (slices in order) is ``stream[k*seq_len : k*seq_len + seq_len + 1]``: inputs are
  ``tokens[:, :-1]``, next-token targets ``tokens[:, 1:]``.
* images: ``images``: uint8 ``[n, H, W, C]`` (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) and ``labels``: int64 ``[n]``
  indexing ``classes``.

``manifest.json`` (keys are exact: an unknown or missing key is an error)::

    {
      "format": "hypha-dataset",
      "version": 1,
      "name": "books",                       # [A-Za-z0-9][A-Za-z0-9._-]{0,63}
      "kind": "text",                        # or "images"
      "created": "2026-11-23T10:00:00Z",
      "num_slices": 2,
      "num_examples": 5000,                  # sequences (text) or images, all slices
      "tensors": {"tokens": {"dtype": "uint8", "shape": [257]}},   # per example
      "text": {"vocab": 256, "seq_len": 256, "total_tokens": 1300000, "files": 12},
      #  or "images": {"classes": ["cat", "dog"], "shape": [32, 32, 3]},
      "slices": [
        {"file": "slice-00000.safetensors", "examples": 4096, "bytes": 1052800, "sha256": "…"},
        ...
      ]
    }

``total_tokens`` counts the whole corpus (separators included); the tail that does not fill a
sequence is not in any slice. A slice's ``sha256`` is over its file's bytes, which are exactly
what a data node sends and a worker checks (:func:`load_slice_bytes` with ``index=``).
"""

from hypha.data.prepare import (
    BUILTIN_CORPORA,
    DEFAULT_SEQ_LEN,
    DEFAULT_SLICE_EXAMPLES,
    DEFAULT_SLICE_TOKENS,
    END_OF_DOCUMENT,
    TEXT_SUFFIXES,
    BuiltinCorpus,
    builtin_corpus_files,
    prepare_builtin_text,
    prepare_images,
    prepare_text,
)
from hypha.data.slices import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    Dataset,
    DatasetError,
    ImagesInfo,
    Manifest,
    SliceInfo,
    TensorSpec,
    TextInfo,
    check_name,
    load_slice_bytes,
    slice_file_name,
)
from hypha.data.tracker import (
    DEFAULT_MAX_ASSIGNED,
    Assignment,
    NoSliceAvailable,
    SliceState,
    SliceTracker,
    TrackerError,
    TrackerStats,
)

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_MAX_ASSIGNED",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SLICE_EXAMPLES",
    "DEFAULT_SLICE_TOKENS",
    "END_OF_DOCUMENT",
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST",
    "TEXT_SUFFIXES",
    "Assignment",
    "BuiltinCorpus",
    "Dataset",
    "DatasetError",
    "ImagesInfo",
    "Manifest",
    "NoSliceAvailable",
    "SliceInfo",
    "SliceState",
    "SliceTracker",
    "TensorSpec",
    "TextInfo",
    "TrackerError",
    "TrackerStats",
    "builtin_corpus_files",
    "check_name",
    "load_slice_bytes",
    "prepare_builtin_text",
    "prepare_images",
    "prepare_text",
    "slice_file_name",
]
