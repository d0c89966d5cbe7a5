"""Moved to ``tvm_patdnn.export`` (issue 14)."""

from ..export import linker_for  # moved to export (issue 14); importers outside H1's files switch at the end
