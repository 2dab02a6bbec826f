"""What runs inside the user's script process for ``steadyclip doctor --script``.

``boot.py`` is started as a file (``python .../boot.py my_script.py ARGS``), never
as ``-m steadyclip...``: importing the ``steadyclip`` package sets ``MKL_CBWR``
and ``CUBLAS_WORKSPACE_CONFIG``, which would change the numbers of the very
script being diagnosed. ``observer.py`` therefore imports only the standard
library at start-up and patches torch / open_clip lazily, when the script
imports them. The parent imports ``observer`` for its constants only.
"""
