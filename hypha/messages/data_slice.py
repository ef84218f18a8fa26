"""Data slices: which worker trains on which part of a dataset, and getting the bytes.

A data node announces a prepared dataset, cut into numbered slices; the scheduler tracks every
slice of every epoch (AVAILABLE → ASSIGNED → USED).

* ``/hypha/data-slice/1``, worker → scheduler: :class:`DataSliceRequest` asks for the next slice
  of ``dataset`` for a job; the scheduler answers :class:`DataSliceAssignment` with the slice,
  its epoch and the data node to fetch it from (or rejects the call, ``RequestRejected``, when
  it has none to give).
* ``/hypha/data-slice-done/1``, worker → scheduler: :class:`DataSliceDone` reports a slice as
  trained on; the scheduler marks it used and answers :class:`DataSliceRecorded`.
* ``/hypha/data-fetch/1``, worker → data node: :class:`FetchSlice` asks for a slice's bytes; the
  data node answers :class:`SliceComing` and then sends the slice (SafeTensors) as a tensor
  stream named ``stream``.
"""

from __future__ import annotations

from typing import Annotated

from hypha.messages._codec import Message, Range, Text
from hypha.messages._common import DatasetName, Id, PeerId
from hypha.net import Protocol

__all__ = [
    "DATA_FETCH",
    "DATA_SLICE",
    "DATA_SLICE_DONE",
    "DataSliceAssignment",
    "DataSliceDone",
    "DataSliceRecorded",
    "DataSliceRequest",
    "FetchSlice",
    "SliceComing",
]

_Count = Annotated[int, Range(ge=0)]


class DataSliceRequest(Message):
    """Job ``job_id`` wants its next slice of ``dataset``."""

    job_id: Id
    dataset: DatasetName


class DataSliceAssignment(Message):
    """Train on slice ``slice`` of ``dataset`` in epoch ``epoch``; ``provider`` serves it."""

    dataset: DatasetName
    slice: _Count
    epoch: _Count
    provider: PeerId


class DataSliceDone(Message):
    """Job ``job_id`` has trained on slice ``slice`` of ``dataset`` in epoch ``epoch``."""

    job_id: Id
    dataset: DatasetName
    slice: _Count
    epoch: _Count


class DataSliceRecorded(Message):
    """The scheduler marked slice ``slice`` of ``dataset`` as used."""

    dataset: DatasetName
    slice: _Count


class FetchSlice(Message):
    """Send me slice ``slice`` of ``dataset``."""

    dataset: DatasetName
    slice: _Count


class SliceComing(Message):
    """Slice ``slice`` of ``dataset`` (``size`` bytes) follows as the tensor stream ``stream``."""

    dataset: DatasetName
    slice: _Count
    size: _Count
    stream: Annotated[str, Text(256, min_len=1)]


DATA_SLICE = Protocol("data-slice", "1", max_request=DataSliceRequest.MAX_SIZE,
                      max_response=DataSliceAssignment.MAX_SIZE)
DATA_SLICE_DONE = Protocol("data-slice-done", "1", max_request=DataSliceDone.MAX_SIZE,
                           max_response=DataSliceRecorded.MAX_SIZE)
DATA_FETCH = Protocol("data-fetch", "1", max_request=FetchSlice.MAX_SIZE,
                      max_response=SliceComing.MAX_SIZE)
