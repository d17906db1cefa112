"""The HTTP adapter: OIP v2 REST on aiohttp.

``routes`` (inference, health, metadata, ``/metrics``, the error middleware), ``admin_routes``
(the token-protected management API and the model repository extension) and ``codec`` (JSON
and Triton's binary tensor format <-> the core's types). Independent of ``serving.grpc``.

Named ``http`` after what it adapts: absolute imports keep the standard library's ``http``
(which aiohttp imports) unshadowed. Only a ``sys.path`` that starts at ``serving/`` itself would
shadow it, as ``python serving`` (the folder run as a script) makes one: use ``python -m
serving``, as everything in kloop does.
"""
