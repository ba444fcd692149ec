"""cmkit studio: a local web page for real-time one-step generation and editing (``cmkit serve``).

:mod:`cmkit.studio.engine` turns the page's requests into calls of :mod:`cmkit.sampling` and
:mod:`cmkit.editing`; :mod:`cmkit.studio.server` is the web server (Starlette on uvicorn, an optional extra);
the page and its assets are in ``static/``.
"""
