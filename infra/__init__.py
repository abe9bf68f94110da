"""The ground floor: generic file and process utilities that the network (``model/``), the data
(``dataset/``), training, evaluation and the scripts all use, and that import nothing of theirs:
atomic writes (atomic), one writer per output (lock), safe reading of shared files
(safe_files), device, threads, logging and progress (runtime), command-line value rules and the
one parser (flags), and the base of every error a user can cause (errors)."""
