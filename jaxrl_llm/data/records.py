"""Re-export of `jaxrl_llm.records` (DataError, read_records, json_type) for imports that predate the move.

The reader lives in the bottom-layer module `jaxrl_llm.records` so that tasks can read files without
importing this package (which imports tasks). New code imports from `jaxrl_llm.records`.
"""

from jaxrl_llm.records import SUFFIXES, DataError, json_type, read_records

__all__ = ["SUFFIXES", "DataError", "json_type", "read_records"]
