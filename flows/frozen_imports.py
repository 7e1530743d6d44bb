"""Imported last by the workers' template (``local_workers.PRELOAD``): what the imports before it built is frozen.

A worker forked from the template inherits ~400k objects from Prefect, Dask, pyarrow and pandas, which never die.
Every full garbage collection in the worker would walk all of them (~50-150 ms each, several per shard of a
no-op job); frozen (``gc.freeze``, what the Python docs advise before a fork), they are left out of every
collection, and their pages are not written to by the collector, so the workers share them with the template.
"""

import gc

gc.freeze()
