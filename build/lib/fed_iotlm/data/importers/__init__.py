"""Importers: public release layouts -> the exchange format (``meta.json`` + npz).

One module per layout, each with an ``import_<layout>(src, dst, ...)`` function for
Python use and ``add_arguments``/``run`` for ``fed-iotlm import <layout> SRC DST``:

- :mod:`.multiiot`: MultiIoT folders ``<root>/<modality>/{train,test}_data.npy``.
- :mod:`.pamap2`: PAMAP2 ``subjectXXX.dat`` recordings, windowed, subject = site.
- :mod:`.uea`: UEA/UCR multivariate ``.ts`` archives, dimensions grouped into modalities.

Every import writes atomically and reads its output back through the validated
loader, so a finished import is a dataset that ``data=npz data.path=DST`` accepts.
"""

from __future__ import annotations

LAYOUTS: tuple[str, ...] = ("multiiot", "pamap2", "uea")
