"""Built-in plugins (installed as ``aquila_npu.plugins``): the ``aquila2`` model family and the ``cpu``, ``cuda``
and ``npu`` devices. Each is a plain module of ``@hookimpl`` functions registered through the entry-point group
``aquila_npu.plugins``; see ``aquila_npu.hookspecs`` for the contract."""
