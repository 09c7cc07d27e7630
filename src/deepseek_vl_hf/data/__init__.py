"""Training data: record formats and readers, tokenisation with labels, batching, and the modality mixture."""

from deepseek_vl_hf.data.collator import VLCollator
from deepseek_vl_hf.data.encoding import IGNORE_INDEX, encode_record
from deepseek_vl_hf.data.mixture import MixtureDataset, ModalitySchedule, Source
from deepseek_vl_hf.data.records import RECORD_KINDS, BadRecord, open_records, read_records

__all__ = [
    "IGNORE_INDEX",
    "RECORD_KINDS",
    "BadRecord",
    "MixtureDataset",
    "ModalitySchedule",
    "Source",
    "VLCollator",
    "encode_record",
    "open_records",
    "read_records",
]
