"""The limiter maths: interleaved GCRA lanes and the ``Leaser`` that spends them (``lanes``), and the record of a
backend's outages (``outages``). Pure Python over a small backend protocol; the blocks in ``slurmctl.blocks`` are the
backends.
"""
