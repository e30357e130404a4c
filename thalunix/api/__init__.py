"""The local API: JSON REST over the engine, an event stream, and the UI's static files, on 127.0.0.1 only.

:mod:`thalunix.api.app` holds the routes (bottle), :mod:`thalunix.api.security` the guard every
request passes (secret token, Host, Origin), :mod:`thalunix.api.openapi` the document describing
the routes, and :mod:`thalunix.api.server` runs it all on waitress on a free port.

Example::

    engine = DirectEngine.open()
    server = ApiServer(engine).start()
    print(server.launch_url)          # http://127.0.0.1:43117/?token=…  (opens the UI once, then a cookie)
    ...
    server.stop()
"""

from thalunix.api.server import ApiServer

__all__ = ["ApiServer"]
