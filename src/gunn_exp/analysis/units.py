"""The one unit of memory in this package's reports: MB means MiB, 2**20 bytes (GB: 2**30).

torch's allocator statistics, the process's RSS and the saved-tensor counts are bytes; every table
that prints them divides by `MB` (columns named `*_mb`, "MiB" in the complexity tables). Binary, as
nvidia-smi and torch's `memory_summary` print them, so the numbers compare without conversion.
"""

MB = 2**20
GB = 2**30
