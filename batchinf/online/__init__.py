"""The online endpoint: ``app`` is the HTTP application on Ray Serve, ``launch`` starts
and stops it for ``batchinf serve``."""
