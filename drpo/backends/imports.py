"""One process-wide lock around first imports of the heavy ML stack.

torch, transformers and sentence-transformers are imported lazily, on worker threads, by the
local backend and by ICL retrieval. Two threads importing them at the same moment can meet
Python's import-deadlock avoidance, which hands one of them a partially initialised module
("cannot import name ..."). Loading under this lock makes the first imports happen one at a time.
"""

import threading

HEAVY_IMPORT_LOCK = threading.RLock()
